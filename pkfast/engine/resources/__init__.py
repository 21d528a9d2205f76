"""engine.resources: what a computation takes from the machine — memory (the allocator's reuse of freed blocks,
:mod:`~pkfast.engine.resources.alloc`; the measured peak of a per-sample pass, :mod:`~pkfast.engine.resources.meter`)
and CPU threads (:mod:`~pkfast.engine.resources.threads`)."""
