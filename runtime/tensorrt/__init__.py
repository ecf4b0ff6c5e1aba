"""TensorRT: engine building (``build``) and the device-loop backend (``backend``).

Everything here imports ``tensorrt`` and ``cuda.bindings`` lazily, through ``api.load``, so that the
rest of sdtrt works without them and tests can pass fakes.
"""
