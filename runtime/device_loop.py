"""The denoising loop on a device: one implementation for TensorRT and for ONNX Runtime with IO binding.

A whole generation runs as U-Net and sampler-update launches back to back, with no host work and no
synchronisation between steps (llama2.c-style preallocated run state):

- the U-Net reads ``latents`` from one buffer and writes its guided prediction into a ring of model
  outputs; the update graph (``sampler_update.onnx``) reads the ring of states and model outputs and
  writes the next fp32 state and, cast, the next U-Net input. Rings are rotated by binding addresses,
  never by copying;
- every per-step input (timestep, coefficient row, noise) is uploaded before the loop into a table
  whose rows start at 256-byte offsets: TensorRT's ``setTensorAddress`` refuses anything less
  aligned (NvInferRuntime.h), and a refused address would silently keep step 0's values;
- the final state comes back once, through the memory's host buffer.

What differs between backends is behind two small interfaces: ``Memory`` (allocate, copy, zero,
synchronise) and ``Launcher`` (set shapes, bind a tensor to an address, launch). A backend may also pass
a ``graphs`` runner that captures the enqueued loop once per shape and replays it (CUDA graphs).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from sdtrt.runtime.samplers import OUTPUT_DEPTH, STATE_DEPTH, SamplerTable, coefficient_row

ALIGN = 256  # bytes; setTensorAddress: "the pointer must have at least 256-byte alignment"
COEFS = STATE_DEPTH + OUTPUT_DEPTH + 1  # one sampler_update ``coefs`` row
RING = STATE_DEPTH + 1  # s_(i+1) is written while s_i .. s_(i-3) are read


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


class Memory(Protocol):
    def malloc(self, nbytes: int) -> int: ...

    def free(self, ptr: int) -> None: ...

    def upload(self, ptr: int, array: np.ndarray) -> None: ...  # a whole buffer, from its start

    def download(self, out: np.ndarray, ptr: int) -> None: ...

    def zero(self, ptr: int, nbytes: int) -> None: ...

    def barrier(self) -> None: ...  # uploads are visible to the launches that follow

    def sync(self) -> None: ...

    def host(self, shape: tuple[int, ...], dtype) -> np.ndarray: ...  # page-locked where the backend has it

    def free_host(self, array: np.ndarray) -> None: ...


class Launcher(Protocol):
    def dtype(self, name: str) -> np.dtype: ...

    def set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None: ...

    def bind(self, name: str, ptr: int) -> None: ...  # raises if the address is refused

    def launch(self) -> None: ...  # raises if the launch is refused


def step_table(rows: np.ndarray, row_bytes: int, dtype=np.float32) -> np.ndarray:
    """``rows`` (S, ...) laid out with each row starting at a multiple of ``row_bytes`` (a multiple of ALIGN)."""
    dtype = np.dtype(dtype)
    rows = np.ascontiguousarray(rows, dtype=dtype).reshape(len(rows), -1)  # (S, n)
    table = np.zeros((len(rows), row_bytes // dtype.itemsize), dtype)  # (S, row_bytes / itemsize)
    table[:, : rows.shape[1]] = rows
    return table


class DeviceLoop:
    """U-Net + sampler update on the device for a whole generation (see the module docstring)."""

    def __init__(self, memory: Memory, unet: Launcher, update: Launcher, graphs=None,
                 on_setup: Callable[[], None] | None = None):
        self.memory, self.unet, self.update, self.graphs = memory, unet, update, graphs
        self.on_setup = on_setup  # called after shapes are set (TensorRT sizes its shared memory there)
        self._key = None
        self._buffers: list[int] = []
        self.result: np.ndarray | None = None
        self.setups = 0  # how many times buffers were (re)allocated (tests read it)

    @property
    def captures(self) -> int:
        return self.graphs.captures if self.graphs is not None else 0

    def _release(self) -> None:
        m = self.memory
        if self.graphs is not None:
            self.graphs.reset()
        for ptr in self._buffers:
            m.free(ptr)
        self._buffers = []
        if self.result is not None:
            m.free_host(self.result)
            self.result = None
        self._key = None

    def close(self) -> None:
        self._release()

    def _alloc(self, nbytes: int) -> int:
        ptr = self.memory.malloc(aligned(nbytes))
        self._buffers.append(ptr)
        return ptr

    def _setup(self, shape: tuple[int, ...], text_shape: tuple[int, ...], steps: int, stochastic: bool) -> None:
        self._release()
        n = int(np.prod(shape))
        self.n32 = n * 4
        self.states = [self._alloc(self.n32) for _ in range(RING)]  # s_i at i % RING, fp32 (B, C, h, w)
        out_bytes = n * self.unet.dtype("noise_pred").itemsize
        self.outputs = [self._alloc(out_bytes) for _ in range(OUTPUT_DEPTH)]  # m_i at i % OUTPUT_DEPTH
        self.ring_bytes = out_bytes
        self.unet_in = self._alloc(n * self.unet.dtype("latents").itemsize)  # (B, C, h, w), U-Net dtype
        self.zero_noise = self._alloc(self.n32)  # the noise input of deterministic steps
        self.noise_stride = aligned(self.n32)
        # (S, B, C, h, w) at 256-byte row offsets; deterministic samplers get none
        self.noise_all = self._alloc(self.noise_stride * steps) if stochastic else None
        self.coefs_all = self._alloc(ALIGN * steps)  # (S, 10) at 256-byte row offsets
        self.timesteps = self._alloc(ALIGN * steps)  # (S,) at 256-byte row offsets
        self.guidance = self._alloc(4)  # (1,)
        self.embeddings = self._alloc(int(np.prod(text_shape)) * self.unet.dtype("encoder_hidden_states").itemsize)
        self.result = self.memory.host(shape, np.float32)
        self.unet.set_shapes({"latents": shape, "encoder_hidden_states": text_shape})
        self.update.set_shapes({name: shape for name in self._update_inputs()})
        if self.on_setup is not None:
            self.on_setup()
        self.setups += 1

    @staticmethod
    def _update_inputs() -> list[str]:
        return ([f"state_{j}" for j in range(STATE_DEPTH)] + [f"model_output_{j}" for j in range(OUTPUT_DEPTH)]
                + ["noise"])

    def _enqueue(self, steps: int, stochastic: bool) -> None:
        """Every step's two launches; no host synchronisation and no allocation in here."""
        u, up = self.unet, self.update
        u.bind("latents", self.unet_in)
        u.bind("encoder_hidden_states", self.embeddings)
        u.bind("guidance_scale", self.guidance)
        up.bind("next_latents", self.unet_in)
        for i in range(steps):
            u.bind("timestep", self.timesteps + ALIGN * i)
            u.bind("noise_pred", self.outputs[i % OUTPUT_DEPTH])
            u.launch()
            for j in range(STATE_DEPTH):
                up.bind(f"state_{j}", self.states[(i - j) % RING])
            for j in range(OUTPUT_DEPTH):
                up.bind(f"model_output_{j}", self.outputs[(i - j) % OUTPUT_DEPTH])
            up.bind("noise", self.noise_all + self.noise_stride * i if stochastic else self.zero_noise)
            up.bind("coefs", self.coefs_all + ALIGN * i)
            up.bind("next_state", self.states[(i + 1) % RING])
            up.launch()

    def generation(self) -> int:
        """Changes when the backend moved memory the loop depends on (TensorRT's shared block)."""
        return 0

    def run(self, table: SamplerTable, state0: np.ndarray, embeddings: np.ndarray, guidance: float,
            noises: np.ndarray | None) -> np.ndarray:
        """The state after the last step (B, C, h, w) float32."""
        m = self.memory
        steps, stochastic = table.num_steps, table.stochastic
        shapes = (state0.shape, embeddings.shape, steps, stochastic)
        if (*shapes, self.generation()) != self._key:
            self._setup(state0.shape, embeddings.shape, steps, stochastic)
            self._key = (*shapes, self.generation())  # set-up itself may have moved the shared memory
        key = self._key
        # Invariant: every ring slot the update reads holds finite values before it is first written.
        # History beyond step 0 has coefficient 0, but device memory starts as garbage and a previous
        # generation may have left Inf/NaN, and 0 * NaN = NaN; so both rings are zeroed on every run.
        for ptr in self.states:
            m.zero(ptr, self.n32)
        for ptr in self.outputs:
            m.zero(ptr, self.ring_bytes)
        m.zero(self.zero_noise, self.n32)
        m.upload(self.states[0], state0.astype(np.float32))  # (B, C, h, w)
        m.upload(self.unet_in, state0.astype(self.unet.dtype("latents")))
        m.upload(self.embeddings, np.ascontiguousarray(embeddings))  # (kB, 77, D)
        m.upload(self.guidance, np.array([guidance], self.unet.dtype("guidance_scale")))
        m.upload(self.timesteps, step_table(table.timesteps[:, None], ALIGN, self.unet.dtype("timestep")))  # (S, 64)
        m.upload(self.coefs_all, step_table(np.stack([coefficient_row(table, i) for i in range(steps)]), ALIGN))
        if stochastic:
            m.upload(self.noise_all, step_table(noises, self.noise_stride))  # (S, stride / 4)
        m.barrier()
        if self.graphs is not None:
            self.graphs.run(key, lambda: self._enqueue(steps, stochastic))
        else:
            self._enqueue(steps, stochastic)
        m.download(self.result, self.states[steps % RING])
        m.sync()
        return self.result.copy()
