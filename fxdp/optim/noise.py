"""Gaussian noise for the Gaussian mechanism of DP-SGD (Abadi et al. 2016).

A :class:`~fxdp.optim.secure.SecureGenerator` (from :func:`secure_generator`) routes
the draw to the hardened CSPRNG sampler of :mod:`fxdp.optim.secure`; any other
generator (or none) uses PyTorch's sampler.
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .chunked_normal import ChunkStreams, chunked, chunked_size
from .secure import SecureGenerator, is_secure, secure_gaussian_mechanism, secure_normal

try:
    import resource
except ImportError:  # pragma: no cover - Windows: the probe times the draws only
    resource = None  # type: ignore[assignment]

__all__ = ["FlatNoise", "SliceDraw", "fill_normal", "gaussian_noise", "noisy_sum", "secure_generator"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _views(buf: Tensor, offsets: Sequence[int], shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Contiguous views of the flat ``buf`` shaped ``shapes[k]`` at ``offsets[k]`` (one
    ``as_strided`` each: a slice and a view would be two calls per parameter and step)."""
    base = buf.storage_offset()
    return [buf.as_strided(shape, _strides(shape), base + o) for o, shape in zip(offsets, shapes)]


def _strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _check_std(std: float) -> None:
    if not std >= 0 or std == float("inf"):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")


def gaussian_noise(
    std: float,
    shape: Sequence[int] | torch.Size,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``N(0, std^2)`` of the given shape.

    ``std == 0`` returns zeros without drawing, so non-private runs leave the
    generator untouched. Without a ``generator`` the global RNG of ``device`` is used.
    If the generator lives on another device, sampling happens there and the result
    is moved (a CPU generator can drive noise for CUDA parameters). Half-precision
    noise is drawn in float32 and rounded once; a large CPU draw runs on every intra-op
    thread (:func:`fill_normal`). With a secure generator the noise is
    :func:`fxdp.optim.secure.secure_normal` (CSPRNG bits, float64, rounded once).
    """
    _check_std(std)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if std == 0:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    if is_secure(generator):
        return secure_normal(std, shape, dtype=dtype, device=device)
    sample_device = generator.device if generator is not None else device
    sample_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
    noise = torch.empty(tuple(shape), dtype=sample_dtype, device=sample_device)
    fill_normal(noise, float(std), generator)
    return noise.to(device=device, dtype=dtype)


def noisy_sum(x: Tensor, std: float, *, generator: torch.Generator | None = None) -> Tensor:
    """The Gaussian mechanism ``x + N(0, std^2)`` on a clipped sum ``x``.

    With a secure generator this is :func:`fxdp.optim.secure.secure_gaussian_mechanism`
    (CSPRNG noise, sum formed in float64 and snapped to a fixed power-of-two grid, so
    the low bits of the result do not reveal ``x``); otherwise ``x +
    gaussian_noise(std, x.shape, ...)``, bit for bit what an optimizer adding the noise
    itself computes. A half-precision sum gets its noise in float32 and is rounded once,
    after it: the rounding is then post-processing of the mechanism's output, where noise
    rounded to bfloat16's 8 bits first would be a Gaussian on a grid the sum shifts.
    """
    if is_secure(generator):
        return secure_gaussian_mechanism(x, std)
    if x.dtype in _LOW_PRECISION and std > 0:
        noise = gaussian_noise(std, x.shape, dtype=torch.float32, device=x.device, generator=generator)
        return noise.add_(x).to(x.dtype)
    return x + gaussian_noise(std, x.shape, dtype=x.dtype, device=x.device, generator=generator)


def fill_normal(buf: Tensor, std: float, generator: torch.Generator | None, threads: int | None = None) -> None:
    """``buf.normal_(0, std)``; a large CPU buffer in chunks with their own streams, on
    ``threads`` (default: PyTorch's intra-op threads; :mod:`fxdp.optim.chunked_normal`:
    CPU's ``normal_`` runs on one thread). The numbers do not depend on ``threads``."""
    if chunked(buf):
        ChunkStreams(buf.numel(), generator).fill_(buf, std, threads=threads)
    else:
        buf.normal_(0.0, std, generator=generator)


def _minor_faults() -> int:
    """Page faults this process has taken so far (0 without ``resource``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


#: each parameter's slice of the flat buffer starts at a multiple of this many elements:
#: CPU's ``normal_`` draws the uniforms of a tensor in order and transforms them in blocks
#: of 16 from its start, so filling the buffer slice by slice, in order, gives the same
#: numbers as one ``normal_`` over all of it
_ALIGN = 16


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class SliceDraw(Sequence):
    """The noise of a released CPU buffer, drawn in order as its views are first read: reading
    view ``k`` draws every slice up to and including ``k`` that is not drawn yet (one
    ``normal_``, of at least ``MIN_ELEMENTS`` in whole slices, so small layers do not cost a
    sampler call each) into storage allocated for those slices then: there is no flat
    buffer. The numbers are those of the whole buffer's draw (:func:`fill_normal`; slices
    aligned to 16); iterating draws the rest. No view is handed out before its slice is
    drawn. Book-keeping reads a layer's views just before adding its clipped sums into them
    and frees the layer's record after, so each piece is allocated as records give their
    memory back, and the C library hands it that memory; one flat buffer, allocated before
    any record was freed, took pages the kernel had to zero at their first touch (timm
    ConvNeXt-atto at 64x64, B = 16: 6,200 page faults a step; ``benchmarks/README.md``,
    Round 30)."""

    #: each draw covers at least this many elements (whole slices; 256 KiB of float32)
    MIN_ELEMENTS = 1 << 16

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, offsets: Sequence[int],
                 shapes: Sequence[torch.Size], std: float, generator: torch.Generator | None) -> None:
        self._numel, self._dtype, self._device = numel, dtype, device
        self._offsets, self._shapes = list(offsets), list(shapes)
        self._ends = self._offsets[1:] + [numel]
        # empty slices take no storage: made now, never drawn
        self._views: list[Tensor | None] = [torch.empty(s, dtype=dtype, device=device) if s.numel() == 0 else None
                                            for s in self._shapes]
        self._std, self._generator = std, generator
        # a large buffer's chunk streams, keyed now: the generator moves on at the draw, as eagerly
        self._streams = ChunkStreams(numel, generator) if chunked_size(numel, dtype, device) else None
        self._drawn = 0  # elements of the buffer drawn so far

    def _draw_to(self, end: int) -> None:
        if end > self._drawn:  # at least MIN_ELEMENTS a call, to whole slices: few sampler calls
            least, threads = self.MIN_ELEMENTS, torch.get_num_threads()
            if self._streams is not None and threads > 1:  # a chunk per thread a call, or it runs on one
                least = max(least, threads * self._streams.chunk)
            k = bisect.bisect_left(self._ends, max(end, self._drawn + least))
            start, end = self._drawn, (self._ends[k] if k < len(self._ends) else self._numel)
            piece = torch.empty(end - start, dtype=self._dtype, device=self._device)
            if self._streams is not None:
                self._streams.fill_(piece, self._std, start, end, base=start)
            else:
                piece.normal_(0.0, self._std, generator=self._generator)
            first, stop = bisect.bisect_left(self._offsets, start), bisect.bisect_left(self._offsets, end)
            held = [j for j in range(first, stop) if self._views[j] is None]  # the piece's non-empty slices
            for j, view in zip(held, _views(piece, [self._offsets[j] - start for j in held],
                                            [self._shapes[j] for j in held])):
                self._views[j] = view
            self._drawn = end

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            raise TypeError("SliceDraw is read one view at a time")
        k = range(len(self._views))[k]
        self._draw_to(self._ends[k])
        return self._views[k]

    def __iter__(self):
        self._draw_to(self._numel)
        return iter(self._views)


class FlatNoise:
    """The Gaussian mechanism on all clipped sums of a step with one draw.

    ``S_k + N(0, std^2)`` for every sum ``S_k``: the noise of every parameter is drawn
    at once into a flat buffer (:func:`fill_normal`: one ``normal_``, or a large CPU
    buffer in chunks on every intra-op thread), and each sum is added into its slice in
    place; the results are views of the buffer, valid until the next call
    (``optimizer.zero_grad()`` drops them as ``p.grad``). On CPU a fresh tensor per
    parameter and a fresh sum cost page faults and one sampler call each: for
    ResNet18's 11.2M parameters the per-parameter draw took 61 ms plus 18 ms for the
    sums, the flat draw 41 ms plus 3 ms (``benchmarks/README.md``, "Round 3"). Each
    parameter's slice starts at a multiple of 16 elements, so a released CPU buffer can be
    drawn slice by slice, each piece in storage of its own, as book-keeping adds each layer's
    sums (``draw(lazy=True)``, :class:`SliceDraw`) with the same numbers as one draw.

    ``keep``: hold the buffer (and its per-parameter views, sliced once per layout)
    between steps (``True``), or release it with the last view (``False``:
    ``zero_grad()`` frees it, as non-private training frees its gradients, so the
    forward and backward passes do not hold one parameter-sized buffer more).
    ``None`` (default): released on CUDA, where the caching allocator makes the next
    allocation free. On CPU a released buffer can cost page faults, in its draw (a fresh
    45 MB buffer: 17 ms) or anywhere in the step (glibc trims its heap, and the next step
    faults it in again), so the first nine draws measure it: three with the buffer kept, three
    with it released, three kept again, and the extra page faults of a released step over the
    kept ones on either side, at the measured cost of a fault, are set against a step
    (:meth:`_measure`). The buffer stays released when that costs at most
    ``RELEASE_MAX_SHARE`` (2%) of a step, or up to ``RELEASE_FOR_MEMORY_MAX_SHARE`` (5%) where
    releasing saves at least that share of the step's peak memory (``memory_saved_share``,
    below), else it is kept from then on. A book-keeping step's released draws, the probe's
    included, are pieces allocated as the records are freed (:class:`SliceDraw`); other
    released draws are one flat buffer. timm's ViT-tiny at 64x64, B = 16 (21 MiB): released
    steps fault no more than kept ones (released); ResNet18 at 32x32 (45 MB): 6,300 page
    faults a released step while the probe runs (glibc growing its heap for the pieces),
    about 10 ms (kept where that is over 5% of a step).
    ``decision`` reports what was measured, and ``memory_saved_share``: a held buffer stacks
    on what the step holds at the draw (``held_bytes``: book-keeping's records), so releasing
    saves about ``min(buffer, held) / (buffer + held)`` of the step's peak (ViT-tiny: 21 MiB
    of noise on 39 MiB of records, 34%).

    Sums of mixed dtype or device, half-precision sums (noise drawn and added in float32,
    the result rounded once) and secure generators keep :func:`noisy_sum` per sum. The noise has
    the same distribution either way; the draw order over parameters differs, so the
    bits differ from a per-parameter draw with the same seed.
    """

    #: the largest share of a step that releasing the CPU buffer may cost (``keep=None``) ...
    RELEASE_MAX_SHARE = 0.02
    #: ... or, where releasing saves at least as large a share of the step's peak memory
    #: (``memory_saved_share``), up to this share
    RELEASE_FOR_MEMORY_MAX_SHARE = 0.05
    #: the cost of a page fault where the probe's first released draw takes too few to time
    #: one (about 1.4 us here: zeroing a 4 KiB page and the kernel's entry and exit)
    FAULT_SECONDS = 1.5e-6

    def __init__(self, keep: bool | None = None) -> None:
        self.keep = keep
        self._cpu_keep = True  # keep=None on CPU: kept, released three draws and kept again to measure, then decided
        self._probe: list[tuple] = []  # (start, end, (faults at start, at end), fresh) of the draws measured
        self.decision: dict | None = None  # keep=None on CPU: the measurement and its outcome
        self._kept: Tensor | None = None  # the buffer, when held between steps
        self._weak: weakref.ref | None = None  # the buffer, while a view of it lives (not kept)
        self._views: tuple = ((), [])  # (shapes, their views of the kept buffer): sliced once per layout
        self._layout: tuple = ((), [], 0)  # (shapes, slice offsets, buffer size)

    @property
    def buffer(self) -> Tensor | None:
        """The last draw's buffer (``None`` once released, or before the first draw)."""
        if self._kept is not None:
            return self._kept
        return self._weak() if self._weak is not None else None

    def keeps(self, device: torch.device) -> bool:
        """Whether the buffer for tensors on ``device`` is held between steps."""
        if self.keep is not None:
            return self.keep
        return device.type == "cpu" and self._cpu_keep

    def _measure(self, start: float, end: float, faults: tuple, fresh: bool, held_bytes: int,
                 buffer_bytes: int) -> None:
        """``keep=None`` on CPU: three draws with the buffer kept, three with it released, three
        kept again (``faults``: the process's page faults at the draw's start and end). Each
        phase's steps (end of draw to end of draw, after its first draw) fault the fewer of
        their two counts; what releasing costs a step is the released steps' faults beyond
        the kept ones' on either side (glibc trims its heap now and then, more as a process
        runs, kept or not), at the cost per fault of the released draw that faulted most, or the
        released draws' extra time where that is more, is set against the share of a step
        allowed (``RELEASE_MAX_SHARE``, or up to ``RELEASE_FOR_MEMORY_MAX_SHARE`` for as large a
        share of the peak saved). The first released draw's own extra is one-off (glibc grows
        its heap once) and only reported."""
        self._probe.append((start, end, faults, fresh))
        n = len(self._probe)
        if n in (2, 3) and fresh:  # the layout changed while kept: start again
            self._probe = [self._probe[-1]]
        elif n in (3, 6):
            self._cpu_keep = n == 6  # released from the next zero_grad() to measure fresh draws, then kept again
        if len(self._probe) < 9:
            return
        seconds = [e - s for s, e, _, _ in self._probe]
        ends = [e for _, e, _, _ in self._probe]
        at_end = [f[1] for _, _, f, _ in self._probe]

        def fewest(k: int) -> tuple:  # (seconds, faults) of phase k's steps: the fewer faults
            return min(((ends[j + 1] - ends[j], at_end[j + 1] - at_end[j]) for j in (3 * k, 3 * k + 1)),
                       key=lambda sf: sf[1])

        (_, before), (step, released), (_, after) = fewest(0), fewest(1), fewest(2)
        extra_faults = max(released - max(before, after), 0)
        reused = min(seconds[k] for k in (1, 2, 6, 7, 8))  # the draws into a kept buffer
        first_extra = max(seconds[3] - reused, 0.0)
        calib = max((3, 4, 5), key=lambda k: self._probe[k][2][1] - self._probe[k][2][0])  # the released ones
        n_faults = self._probe[calib][2][1] - self._probe[calib][2][0]
        per_fault = max(seconds[calib] - reused, 0.0) / n_faults if n_faults >= 256 else self.FAULT_SECONDS
        extra = max(extra_faults * per_fault, min(seconds[4:6]) - reused, 0.0)
        memory_share = min(buffer_bytes, held_bytes) / (buffer_bytes + held_bytes) if buffer_bytes else 0.0
        allowed = max(self.RELEASE_MAX_SHARE, min(memory_share, self.RELEASE_FOR_MEMORY_MAX_SHARE))
        self._cpu_keep = extra > allowed * step
        self.decision = {"released_extra_ms": 1e3 * extra, "extra_faults_per_step": extra_faults,
                         "fault_us": 1e6 * per_fault, "first_released_draw_extra_ms": 1e3 * first_extra,
                         "step_ms": 1e3 * step, "memory_saved_share": memory_share, "allowed_share": allowed,
                         "keep": self._cpu_keep}

    def __call__(self, sums: Sequence[Tensor], std: float, *, generator: torch.Generator | None = None) -> list[Tensor]:
        _check_std(std)
        if not sums:
            return []
        if not self.fits(sums, generator):
            return [noisy_sum(s, std, generator=generator) for s in sums]
        return [view.add_(s) for view, s in zip(self.draw(sums, std, generator=generator), sums)]

    @staticmethod
    def fits(like: Sequence[Tensor], generator: torch.Generator | None = None) -> bool:
        """Whether one flat draw serves tensors like ``like`` (else :func:`noisy_sum` each)."""
        if not like:
            return False
        dtype, device = like[0].dtype, like[0].device
        return (
            not is_secure(generator)
            and dtype not in _LOW_PRECISION
            and all(s.dtype == dtype and s.device == device for s in like)
            and (generator is None or generator.device == device)
        )

    def _offsets(self, shapes: tuple) -> tuple[list[int], int]:
        """Each shape's slice offset (aligned to 16) and the buffer's size, once per layout."""
        if self._layout[0] != shapes:
            offsets, total = [], 0
            for shape in shapes:
                offsets.append(total)
                total += _padded(shape.numel())
            self._layout = (shapes, offsets, total)
        return self._layout[1], self._layout[2]

    def draw(self, like: Sequence[Tensor], std: float, *, generator: torch.Generator | None = None,
             lazy: bool = False, held_bytes: Callable[[], int] | None = None) -> Sequence[Tensor]:
        """``N(0, std^2)`` noise shaped like each of ``like`` (for which :meth:`fits`), as
        views of the buffer: the optimizer adds the clipped sums into them in place.
        ``lazy``: a released CPU buffer is drawn slice by slice as the views are read, into
        storage allocated then (:class:`SliceDraw`, the same numbers). ``held_bytes()``: what
        the caller holds at the draw (book-keeping's records), read while the first draws are
        measured."""
        _check_std(std)
        dtype, device = like[0].dtype, like[0].device
        shapes = tuple(s.shape for s in like)
        offsets, numel = self._offsets(shapes)
        measuring = self.keep is None and device.type == "cpu" and self.decision is None
        start, faults = (time.perf_counter(), _minor_faults()) if measuring else (0.0, 0)
        # sliced draws on CPU only (another device's sampler numbers its draws per call)
        if lazy and std != 0 and not self.keeps(device) and device.type == "cpu":
            self._kept, self._views, self._weak = None, ((), []), None  # no flat buffer: pieces
            pieces = SliceDraw(numel, dtype, device, offsets, shapes, float(std), generator)
            if measuring:  # a released draw of the probe: its pieces are drawn, and fault, in the step it counts
                self._measure(start, time.perf_counter(), (faults, _minor_faults()), True,
                              held_bytes() if held_bytes else 0, numel * like[0].element_size())
            return pieces
        buf = self.buffer
        fresh = buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device
        if fresh:
            buf = torch.empty(numel, dtype=dtype, device=device)
        if std == 0:
            buf.zero_()  # draws nothing: a non-private run leaves the generator untouched
        else:  # the probe's draws on one thread: faults taken in parallel would look cheap
            fill_normal(buf, float(std), generator, threads=1 if measuring else None)
        if measuring:
            end, faults = time.perf_counter(), (faults, _minor_faults())
            self._measure(start, end, faults, fresh, held_bytes() if held_bytes else 0, numel * buf.element_size())
        if not self.keeps(device):  # no reference of ours keeps it alive past the views
            self._kept, self._views, self._weak = None, ((), []), weakref.ref(buf)
            return _views(buf, offsets, shapes)
        self._kept, self._weak = buf, None
        if self._views[0] != shapes or not self._views[1] or self._views[1][0]._base is not buf:
            self._views = (shapes, _views(buf, offsets, shapes))
        return list(self._views[1])


def secure_generator(device: torch.device | str | None = None) -> SecureGenerator:
    """A generator that makes fxdp draw from the CSPRNG (:class:`SecureGenerator`).

    Noise (:func:`gaussian_noise`) and Poisson sampling (:class:`fxdp.data.PoissonSampler`)
    given this generator take every bit from ``os.urandom`` (or a ChaCha20 keystream
    keyed from it, see :func:`fxdp.optim.secure.set_backend`) and harden the
    floating-point Gaussian (Mironov 2012; Holohan & Braghin 2021). It can be neither
    seeded nor restored. Its PyTorch engine, used only by foreign code, is seeded from
    ``os.urandom``.
    """
    return SecureGenerator(device)
