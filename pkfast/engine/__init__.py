"""engine: how a Gram is computed — the model as a function of its parameters, per-sample passes, captured layer
factors, the routes and their cost model, the tiling and the one tile loop, and ``acc += α·A Bᵀ``.

Data flow (imports point down this list):

- :mod:`~pkfast.engine.quadrature` the quadrature rule's weighted terms over evaluation points;
- :mod:`~pkfast.engine.accumulate`, :mod:`~pkfast.engine.tiles`, :mod:`~pkfast.engine.products`,
  :mod:`~pkfast.engine.distributed`, :mod:`~pkfast.engine.resources`: the numerical base (products into a tile,
  the tiling, rank shares; memory reuse, the measured peak of a pass, CPU threads);
- :mod:`~pkfast.engine.inputs`, :mod:`~pkfast.engine.per_sample`, :mod:`~pkfast.engine.functional`: samples
  packed into one tensor and the model as a function of its trainable parameters;
- :mod:`~pkfast.engine.capture`: layer factors captured by hooks in batched passes (rules: :mod:`pkfast.layers`);
- :mod:`~pkfast.engine.routes`: the routes that form each side of a kernel term and their product;
- :mod:`~pkfast.engine.driver`: a job planned once and its one tile loop.
"""
