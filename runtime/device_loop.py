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

Tasks differ only in data (the initial state, the table, constant inputs): inpainting U-Nets read a mask and
masked-image latents bound once for the whole loop (SDXL's added conditions likewise, for the U-Net and its
ControlNets); 4-channel inpainting's blend reads a mask, the image
latents and the initial noise in the update graph (all ones and zeros when there is nothing to blend).
ControlNets run before the U-Net in each step, chained: each reads the residuals the ones before it summed (a
zeroed set for the first) and writes the sum with its own into the other of two sets, which the U-Net then reads;
their per-step conditioning scales are a table uploaded with the others. A ControlNet whose scale is 0 at a step
(outside its start/end range) is not launched there; the U-Net reads the zeroed set when none ran.

What differs between backends is behind two small interfaces: ``Memory`` (allocate, copy, zero,
synchronise) and ``Launcher`` (set shapes, bind a tensor to an address, launch). A backend may also pass
a ``graphs`` runner that captures the enqueued loop once per shape and replays it (CUDA graphs).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from sdtrt.manifest import resolve_shape
from sdtrt.runtime.samplers import OUTPUT_DEPTH, STATE_DEPTH, SamplerTable, coefficient_row

ALIGN = 256  # bytes; setTensorAddress: "the pointer must have at least 256-byte alignment"
RING = STATE_DEPTH + 1  # s_(i+1) is written while s_i .. s_(i-3) are read


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


def attempt_all(steps) -> None:
    """Run every callable of ``steps`` even when some raise; raise the first error once all were tried. For close
    paths: after a sticky CUDA error every call fails, and stopping at the first would leak everything after it."""
    first = None
    for step in steps:
        try:
            step()
        except BaseException as ex:  # noqa: BLE001  (re-raised below, after the rest ran)
            first = first or ex
    if first is not None:
        raise first


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
                 on_setup: Callable[[], None] | None = None, controlnets: dict[str, Launcher] | None = None):
        self.memory, self.unet, self.update, self.graphs = memory, unet, update, graphs
        self.controlnets = dict(controlnets or {})  # component name -> launcher
        self.on_setup = on_setup  # called after shapes are set (TensorRT sizes its shared memory there)
        self._key = None
        self._buffers: list[int] = []
        self.result: np.ndarray | None = None
        self.setups = 0  # how many times buffers were (re)allocated (tests read it)

    @property
    def captures(self) -> int:
        return self.graphs.captures if self.graphs is not None else 0

    def _release(self) -> None:
        """Free every buffer; each free is attempted even when one fails (after a sticky CUDA error every call does),
        and the first error is raised after the rest were tried."""
        m = self.memory
        buffers, result = self._buffers, self.result
        self._buffers, self.result, self._key = [], None, None
        steps = [self.graphs.reset] if self.graphs is not None else []
        steps += [lambda p=p: m.free(p) for p in buffers]
        if result is not None:
            steps.append(lambda: m.free_host(result))
        attempt_all(steps)

    def close(self) -> None:
        self._release()

    def _alloc(self, nbytes: int) -> int:
        ptr = self.memory.malloc(aligned(nbytes))
        self._buffers.append(ptr)
        return ptr

    def _setup(self, shape: tuple[int, ...], text_shape: tuple[int, ...], steps: int, stochastic: bool,
               constants: dict[str, tuple[int, ...]], controls: dict[str, tuple[int, ...]]) -> None:
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
        self.coefs_all = self._alloc(ALIGN * steps)  # (S, COEFS) at 256-byte row offsets
        self.timesteps = self._alloc(ALIGN * steps)  # (S,) at 256-byte row offsets
        self.guidance = self._alloc(4)  # (1,)
        self.embeddings = self._alloc(int(np.prod(text_shape)) * self.unet.dtype("encoder_hidden_states").itemsize)
        # constant U-Net inputs (an inpainting U-Net's mask and masked-image latents), in the U-Net's dtypes
        self.constants = {name: self._alloc(int(np.prod(s)) * self.unet.dtype(name).itemsize)
                          for name, s in constants.items()}
        blend = update_shapes(shape)
        self.blend = {name: self._alloc(int(np.prod(blend[name])) * 4) for name in BLEND_INPUTS}  # fp32
        # ControlNet residuals (kB, c_i, h / f_i, w / f_i) in the U-Net's dtypes: a zeroed set (what the U-Net reads
        # when no ControlNet ran, and the first ControlNet's input) and two sets the chain alternates between
        residual = residual_shapes(self.unet.component, text_shape[0], shape[2], shape[3])
        self.residual_bytes = {name: int(np.prod(s)) * self.unet.dtype(name).itemsize for name, s in residual.items()}
        sets = 1 + min(len(controls), 2)
        self.residuals = [{name: self._alloc(n) for name, n in self.residual_bytes.items()} for _ in range(sets)]
        self.control_images = {key: self._alloc(int(np.prod(s)) * self.controlnets[key].dtype("control_image").itemsize)
                               for key, s in controls.items()}  # (B, 3, H, W) each
        self.control_scales = self._alloc(ALIGN * steps * len(controls)) if controls else None  # (S, N) at 256 B
        self.result = self.memory.host(shape, np.float32)
        self.unet.set_shapes({"latents": shape, "encoder_hidden_states": text_shape, **constants, **residual})
        # the U-Net's constants a ControlNet takes too (SDXL's text_embeds, time_ids) are read from the same buffers
        self.control_constants = {key: shared_constants(self.controlnets[key], constants) for key in controls}
        for key, image_shape in controls.items():
            self.controlnets[key].set_shapes({"latents": shape, "encoder_hidden_states": text_shape,
                                              "control_image": image_shape,
                                              **{name: constants[name] for name in self.control_constants[key]},
                                              **{f"{name}_in": s for name, s in residual.items()}})
        self.update.set_shapes(update_shapes(shape))
        if self.on_setup is not None:
            self.on_setup()
        self.setups += 1

    def _enqueue(self, steps: int, stochastic: bool, active: tuple[tuple[int, ...], ...]) -> None:
        """Every step's launches (``active[i]``: the ControlNets that run at step i); no host synchronisation and no
        allocation in here."""
        u, up = self.unet, self.update
        u.bind("latents", self.unet_in)
        u.bind("encoder_hidden_states", self.embeddings)
        u.bind("guidance_scale", self.guidance)
        for name, ptr in self.constants.items():
            u.bind(name, ptr)
        for name, ptr in self.blend.items():
            up.bind(name, ptr)
        up.bind("next_latents", self.unet_in)
        keys = list(self.control_images)
        for key in keys:
            cn = self.controlnets[key]
            cn.bind("latents", self.unet_in)
            cn.bind("encoder_hidden_states", self.embeddings)
            cn.bind("control_image", self.control_images[key])
            for name in self.control_constants[key]:
                cn.bind(name, self.constants[name])
        for i in range(steps):
            summed = self.residuals[0]  # zeroed
            for n, j in enumerate(active[i]):
                cn = self.controlnets[keys[j]]
                cn.bind("timestep", self.timesteps + ALIGN * i)
                cn.bind("conditioning_scale", self.control_scales + ALIGN * (i * len(keys) + j))
                out = self.residuals[1 + n % 2]
                for name in self.residual_bytes:
                    cn.bind(f"{name}_in", summed[name])
                    cn.bind(name, out[name])
                cn.launch()
                summed = out
            for name in self.residual_bytes:
                u.bind(name, summed[name])
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
            noises: np.ndarray | None, constants: dict[str, np.ndarray] | None = None,
            blend: dict[str, np.ndarray] | None = None, controls: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The state after the last step (B, C, h, w) float32. ``constants``: extra U-Net inputs, the same for every
        step; ``blend``: 4-channel inpainting's ``mask`` (B, 1, h, w), ``image_latents`` and ``init_noise``
        (B, C, h, w), or None for no blend; ``controls``: ControlNet component -> its control image (B, 3, H, W),
        in the order of ``table.control_scale``'s columns."""
        m = self.memory
        constants, controls = constants or {}, controls or {}
        steps, stochastic = table.num_steps, table.stochastic
        const_shapes = {name: tuple(v.shape) for name, v in sorted(constants.items())}
        control_shapes = {key: tuple(v.shape) for key, v in controls.items()}
        scales = table.control_scale if controls else np.zeros((steps, 0))  # (S, N)
        active = tuple(tuple(j for j in range(scales.shape[1]) if scales[i, j] != 0) for i in range(steps))
        shapes = (state0.shape, embeddings.shape, steps, stochastic, tuple(const_shapes.items()),
                  tuple(control_shapes.items()), active)  # which ControlNets run when is part of what is captured
        if (*shapes, self.generation()) != self._key:
            self._setup(state0.shape, embeddings.shape, steps, stochastic, const_shapes, control_shapes)
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
        for name, ptr in self.residuals[0].items():  # the zeroed residual set: read, never written
            m.zero(ptr, self.residual_bytes[name])
        m.upload(self.states[0], state0.astype(np.float32))  # (B, C, h, w)
        m.upload(self.unet_in, state0.astype(self.unet.dtype("latents")))
        m.upload(self.embeddings, np.ascontiguousarray(embeddings))  # (kB, 77, D)
        m.upload(self.guidance, np.array([guidance], self.unet.dtype("guidance_scale")))
        m.upload(self.timesteps, step_table(table.timesteps[:, None], ALIGN, self.unet.dtype("timestep")))  # (S, 64)
        m.upload(self.coefs_all, step_table(np.stack([coefficient_row(table, i) for i in range(steps)]), ALIGN))
        for name, value in constants.items():
            m.upload(self.constants[name], np.ascontiguousarray(value, self.unet.dtype(name)))
        # no blend: mask 1 everywhere and zeros to mix in, so the update's (1 - mask) * (...) term is exactly 0
        sizes = update_shapes(state0.shape)
        for name in BLEND_INPUTS:
            value = blend[name] if blend is not None else np.full(sizes[name], name == "mask", np.float32)
            m.upload(self.blend[name], np.ascontiguousarray(value, np.float32))
        if stochastic:
            m.upload(self.noise_all, step_table(noises, self.noise_stride))  # (S, stride / 4)
        for k, value in controls.items():
            m.upload(self.control_images[k], np.ascontiguousarray(value, self.controlnets[k].dtype("control_image")))
        if controls:
            dtype = self.controlnets[next(iter(controls))].dtype("conditioning_scale")
            m.upload(self.control_scales, step_table(scales.reshape(-1, 1), ALIGN, dtype))  # (S * N, 64)
        m.barrier()
        if self.graphs is not None:
            self.graphs.run(key, lambda: self._enqueue(steps, stochastic, active))
        else:
            self._enqueue(steps, stochastic, active)
        m.download(self.result, self.states[steps % RING])
        m.sync()
        return self.result.copy()


BLEND_INPUTS = ("mask", "image_latents", "init_noise")


def residual_shapes(unet, rows: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """The U-Net component's ControlNet residual inputs -> their shapes for ``rows`` = kB and latents (h, w)."""
    values = {"text_batch": rows, "latent_height": height, "latent_width": width}
    return {s.name: resolve_shape(s.shape, values) for s in unet.inputs
            if s.name.startswith("down_residual_") or s.name == "mid_residual"}


def taken_by(engine) -> set[str]:
    """The input names of an engine (or a launcher): what it reads of what the loop has."""
    return {s.name for s in engine.component.inputs}


def shared_constants(controlnet, constants) -> list[str]:
    """The U-Net's constant inputs (``constants``: their names) that ``controlnet`` takes too; the loop binds the
    U-Net's buffers to it (the manifest check makes sure both take them in the same dtype)."""
    return [name for name in constants if name in taken_by(controlnet)]


def update_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Every input shape of the sampler-update graph for latents of ``shape`` (B, C, h, w)."""
    names = [f"state_{j}" for j in range(STATE_DEPTH)] + [f"model_output_{j}" for j in range(OUTPUT_DEPTH)]
    b, _, h, w = shape
    return {**{n: tuple(shape) for n in names + ["noise", "image_latents", "init_noise"]}, "mask": (b, 1, h, w)}
