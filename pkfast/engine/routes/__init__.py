"""routes: how a Gram's tiles are formed — one interface (:class:`~pkfast.engine.routes.base.Route`), three routes.

- :mod:`~pkfast.engine.routes.jacobian`: every parameter's Jacobian by ``vmap(jacrev)`` (the torch.func tutorial);
- :mod:`~pkfast.engine.routes.layered`: layers with a rule (:mod:`pkfast.layers`) factorised or materialised from
  their inputs and output gradients (captured by :mod:`~pkfast.engine.capture`), the rest by ``jacrev``;
- :mod:`~pkfast.engine.routes.sketch`: products of random path features computed once.
"""
