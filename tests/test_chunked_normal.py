"""Chunk streams of the flat noise draw (fxdp/optim/chunked_normal.py): each chunk is a
Mersenne Twister with a state of our choosing, its numbers independent of the thread
count, of how the buffer is cut into draws, and distributed as N(0, std^2)."""

import numpy as np
import pytest
import torch

from fxdp.optim import chunked_normal as cn
from fxdp.optim.noise import FlatNoise, SliceDraw, fill_normal


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cn, "CHUNK", 4096)
    return 4096


def test_generator_state_layout_is_the_known_one():
    assert cn._state_template() is not None  # else every draw is one normal_ (slower, as correct)


def test_each_chunk_runs_mt19937_from_the_state_written():
    """The chunk generator's raw words are numpy's MT19937 from the same 624-word key: the
    whole state is ours, not a 32-bit seed."""
    states = cn._mt_states(3, (12345, 67890))
    for state in states:
        g = torch.Generator()
        g.set_state(torch.from_numpy(state.copy()))
        key = state[cn._STATE_AT:cn._STATE_AT + 8 * 624].view(np.uint64).astype(np.uint32)
        mt = np.random.MT19937()
        mt.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
        raw = mt.random_raw(16)
        got = torch.empty(8, dtype=torch.int64).random_(0, 2**31, generator=g)  # one int64 per two words
        assert got.tolist() == (raw[1::2] & 0x7FFFFFFF).tolist()
    words = states[:, cn._STATE_AT:cn._STATE_AT + 8 * 624].view(np.uint64)
    assert len({w.tobytes() for w in words}) == 3


def test_numbers_do_not_depend_on_threads_or_on_how_the_draw_is_cut(small_chunks):
    n = 5 * small_chunks + 48  # five whole chunks and a short one
    whole = {}
    for threads in (1, 2, 3):
        buf = torch.empty(n, dtype=torch.float64)
        cn.ChunkStreams(n, torch.Generator().manual_seed(5)).fill_(buf, 0.5, threads=threads)
        whole[threads] = buf
    assert torch.equal(whole[1], whole[2]) and torch.equal(whole[1], whole[3])
    cut = torch.empty(n, dtype=torch.float64)
    streams = cn.ChunkStreams(n, torch.Generator().manual_seed(5))
    for a, b in [(0, 1024), (1024, 9216), (9216, 9232), (9232, n)]:  # in order, aligned to 16, across chunks
        streams.fill_(cut, 0.5, a, b, threads=2)
    assert torch.equal(cut, whole[1])


def test_chunks_are_gaussian_and_uncorrelated_across_chunks_and_draws(small_chunks):
    """Chunk means and standard deviations within 6 standard errors of N(0, 0.7^2), and every
    pair of chunks (of one draw and of the next) uncorrelated within 6 / sqrt(n)."""
    n, std, g = 8 * small_chunks, 0.7, torch.Generator().manual_seed(0)
    draws = []
    for _ in range(2):
        buf = torch.empty(n, dtype=torch.float64)
        fill_normal(buf, std, g)
        draws.append(buf.view(8, small_chunks))
    chunks = torch.cat(draws)
    m = small_chunks
    assert (chunks.mean(1).abs() < 6 * std / m**0.5).all()
    assert ((chunks.std(1) - std).abs() < 6 * std / (2 * m) ** 0.5).all()
    corr = torch.corrcoef(chunks)
    off = corr[~torch.eye(16, dtype=torch.bool)]
    assert off.abs().max() < 6 / m**0.5


def test_the_callers_generator_moves_on_by_its_key_only_and_resumes(small_chunks):
    """Two 63-bit numbers a draw: restoring the generator's state restores the noise."""
    n, g = 3 * small_chunks, torch.Generator().manual_seed(11)
    saved = g.get_state()
    a = torch.empty(n)
    fill_normal(a, 1.0, g)
    key_only = torch.Generator().manual_seed(11)
    torch.empty(2, dtype=torch.int64).random_(generator=key_only)
    assert torch.equal(g.get_state(), key_only.get_state())
    g.set_state(saved)
    b = torch.empty(n)
    fill_normal(b, 1.0, g)
    assert torch.equal(a, b)
    c = torch.empty(n)
    fill_normal(c, 1.0, g)
    assert not torch.equal(b, c)


def test_small_buffers_other_devices_and_unknown_layouts_draw_one_normal(monkeypatch, small_chunks):
    n = small_chunks  # not more than one chunk
    buf, ref = torch.empty(n), torch.empty(n)
    fill_normal(buf, 0.3, torch.Generator().manual_seed(2))
    ref.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(buf, ref)
    assert not cn.chunked(torch.empty(4 * n, dtype=torch.int64))
    monkeypatch.setattr(cn, "_state_template", lambda: None)
    big, ref = torch.empty(4 * n), torch.empty(4 * n)
    fill_normal(big, 0.3, torch.Generator().manual_seed(2))
    ref.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(big, ref)


def test_flat_noise_in_chunks_lazy_or_eager_is_the_same_draw(monkeypatch, small_chunks):
    """The optimizer's flat buffer, drawn at once or layer by layer as book-keeping reads the
    views (a released CPU buffer), gives the same numbers with chunk streams too."""
    like = [torch.zeros(3000), torch.zeros(70, 100), torch.zeros(5), torch.zeros(9000)]
    eager = FlatNoise(keep=False).draw(like, 0.5, generator=torch.Generator().manual_seed(7))
    assert sum(v.numel() for v in eager) > small_chunks
    monkeypatch.setattr(SliceDraw, "MIN_ELEMENTS", 20)
    mech, g = FlatNoise(keep=False), torch.Generator().manual_seed(7)
    lazy = mech.draw(like, 0.5, generator=g, lazy=True)
    assert isinstance(lazy, SliceDraw)
    for k in (1, 0, 3, 2):
        assert torch.equal(lazy[k], eager[k])


@pytest.mark.parametrize("keep", [True, False])
def test_flat_noise_views_are_disjoint_contiguous_slices_of_one_buffer(keep):
    """Each parameter's noise is a contiguous view of the flat buffer shaped like it, at its own
    offset (no two overlap), holding the buffer's numbers in order; the optimizer adds the
    clipped sums into these views in place."""
    like = [torch.zeros(3, 5), torch.zeros(7), torch.zeros(()), torch.zeros(2, 0, 4), torch.zeros(4, 1, 2)]
    views = FlatNoise(keep=keep).draw(like, 1.0, generator=torch.Generator().manual_seed(3))
    base = views[0]._base
    assert base is not None and base.dim() == 1
    spans = []
    for v, t in zip(views, like):
        assert v.shape == t.shape and v.is_contiguous() and v._base is base
        start = v.storage_offset() - base.storage_offset()
        assert start % 16 == 0
        spans.append((start, start + v.numel()))
        assert torch.equal(v.reshape(-1), base[start:start + v.numel()])
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    views[1].add_(1.0)  # in place, into the buffer
    start = views[1].storage_offset() - base.storage_offset()
    assert torch.equal(base[start:start + 7], views[1])


def test_the_keep_probe_times_its_draws_on_one_thread(monkeypatch, small_chunks):
    """``FlatNoise``'s probe sets the page faults of a released buffer against a step: drawn
    in parallel they would look cheaper than they are in the step. Once decided, all threads."""
    calls = []
    real = cn.ChunkStreams.fill_

    def spy(self, buf, std, start=0, end=None, threads=None):
        calls.append(threads)
        return real(self, buf, std, start, end, threads)

    monkeypatch.setattr(cn.ChunkStreams, "fill_", spy)
    mech, g = FlatNoise(), torch.Generator().manual_seed(0)
    like = [torch.zeros(3 * small_chunks)]
    for _ in range(10):
        mech.draw(like, 1.0, generator=g)
    assert mech.decision is not None
    assert calls == [1] * 9 + [None]


def test_state_worker_threads_would_not_share_keeps_the_draw_on_the_callers_thread(small_chunks):
    """Inference mode (its tensors refuse in-place writes on other threads) and Python
    dispatch modes (a profiler counting ops) draw on the caller's thread: the same numbers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, ref = 4 * small_chunks, torch.empty(4 * small_chunks)
    cn.ChunkStreams(n, torch.Generator().manual_seed(1)).fill_(ref, 1.0, threads=1)

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.normal_.default:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode():
        buf = torch.empty(n)
        cn.ChunkStreams(n, torch.Generator().manual_seed(1)).fill_(buf, 1.0, threads=3)
    assert torch.equal(buf, ref)
    out = torch.empty(n)
    with Count():
        cn.ChunkStreams(n, torch.Generator().manual_seed(1)).fill_(out, 1.0, threads=3)
    assert Count.calls == 4 and torch.equal(out, ref)


def test_a_book_keeping_step_is_the_same_at_any_thread_count(small_chunks):
    """End to end: a DP step of a model with more than one chunk of parameters updates them
    to the same bits at 1 and at 2 threads (noise drawn in order on one, in parallel on two)."""
    import fxdp
    from fxdp.optim import DPOptimizer

    x, y = torch.randn(8, 60, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3
    before, after = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = fxdp.privatize(torch.nn.Sequential(torch.nn.Linear(60, 160), torch.nn.Tanh(), torch.nn.Linear(160, 3)),
                                   grad_sample_mode="bk")
            assert sum(p.numel() for p in model.parameters()) > 2 * small_chunks
            opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=8, generator=torch.Generator().manual_seed(3))
            opt.attach_bookkeeping(model.bookkeeping)
            opt.flat_noise.keep = False  # drawn layer by layer as the sums are added (SliceDraw)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(after[0], after[1])


def test_per_parameter_noise_of_a_large_tensor_is_drawn_in_chunks_too(small_chunks):
    """``gaussian_noise`` (the per-sum path: half precision, mixed dtypes) draws through
    ``fill_normal``: in chunks above ``CHUNK``, rounded once to half precision."""
    from fxdp.optim.noise import gaussian_noise

    shape = (3, small_chunks)
    ref = torch.empty(shape)
    fill_normal(ref, 0.5, torch.Generator().manual_seed(4))
    got = gaussian_noise(0.5, shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, ref)
    half = gaussian_noise(0.5, shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(4))
    assert half.dtype == torch.bfloat16 and torch.equal(half, ref.to(torch.bfloat16))
