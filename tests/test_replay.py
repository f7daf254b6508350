"""efficienttrain.replay: batch composition, FIFO eviction, memory bound, determinism."""
import pytest
import torch

from efficienttrain.replay import ReplayBuffer


def batch(tag: int, n: int = 8):
    """A loader batch whose every sample carries its (batch, index) identity."""
    imgs = torch.full((n, 3, 4, 4), tag, dtype=torch.uint8)
    ids = torch.arange(n) + 100 * tag
    return imgs, ids


def test_composition_fresh_first_then_replayed_chunks():
    buf = ReplayBuffer(capacity=4, replay_times=3, chunks_per_batch=4, pin_memory=False, seed=0)
    imgs, ids = batch(1)
    out_imgs, out_ids = buf.step(imgs, ids)
    assert out_imgs.shape[0] == 3 * 8 and out_ids.shape[0] == 24
    assert torch.equal(out_ids[:8], ids)                     # the fresh batch comes first, untouched
    replayed = out_ids[8:].view(-1, 2)                        # (rt-1)*chunks chunks of 8/4 = 2 samples
    assert replayed.shape[0] == 2 * 4
    fresh_chunks = {tuple(c.tolist()) for c in ids.chunk(4)}
    assert all(tuple(c.tolist()) in fresh_chunks for c in replayed)  # only stored chunks are drawn
    # images travel with their ids
    assert torch.equal(out_imgs[8:, 0, 0, 0].long(), torch.div(out_ids[8:], 100, rounding_mode="floor"))


def test_replay_draws_uniformly_with_replacement_from_stored_chunks():
    # capacity 3 batches x 4 chunks; one step with rt=101 draws 400 chunks at once
    buf = ReplayBuffer(capacity=3, replay_times=101, chunks_per_batch=4, pin_memory=False, seed=1)
    buf.replay_times = 1
    for t in range(3):
        buf.step(*batch(t))
    buf.replay_times = 101
    _, ids = buf.step(*batch(3))            # stores batch 3, evicts batch 0 (FIFO)
    chunk_ids = ids[8:].view(-1, 2)[:, 0]   # first id of every replayed chunk (2 samples each)
    assert chunk_ids.numel() == 400
    counts = torch.bincount(chunk_ids)
    expected = {100 * t + 2 * c for t in (1, 2, 3) for c in range(4)}
    assert set(torch.nonzero(counts).flatten().tolist()) == expected  # evicted batch 0 never appears
    drawn = counts[sorted(expected)].float()
    assert drawn.min() >= 15 and drawn.max() <= 55                      # ~33 each: uniform


def test_fifo_eviction_and_memory_bound():
    buf = ReplayBuffer(capacity=2, replay_times=2, chunks_per_batch=2, pin_memory=False, seed=0)
    per_batch_bytes = 8 * 3 * 4 * 4 * 1 + 8 * 8  # uint8 images + int64 ids
    for t in range(5):
        buf.step(*batch(t))
        assert buf.num_batches == min(t + 1, 2)
        assert buf.nbytes == min(t + 1, 2) * per_batch_bytes
    for _ in range(20):  # stores 9, evicts 3: only batches 4 and 9 can come back
        _, ids = buf.step(*batch(9))
        assert set(torch.div(ids[8:], 100, rounding_mode="floor").tolist()) <= {4, 9}
    buf.clear()
    assert len(buf) == 0 and buf.nbytes == 0


def test_eviction_drops_the_oldest_batch_first():
    buf = ReplayBuffer(capacity=2, replay_times=1, chunks_per_batch=2, pin_memory=False)
    for t in range(4):
        buf.step(*batch(t))
    stored_tags = [int(buf.chunk(1, p)[0]) // 100 for p in range(len(buf))]
    assert stored_tags == [2, 2, 3, 3]                          # oldest first, two chunks each


def test_same_seed_same_batches_and_state_round_trip():
    def run(seed, n=6, state=None):
        buf = ReplayBuffer(capacity=8, replay_times=4, chunks_per_batch=4, pin_memory=False, seed=seed)
        if state is not None:
            buf.load_state_dict(state)
        return [buf.step(*batch(t))[1] for t in range(n)], buf

    a, _ = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    _, buf = run(3, n=2)
    state = buf.state_dict()
    nxt = buf.step(*batch(7))[1]
    buf2 = ReplayBuffer(capacity=8, replay_times=4, chunks_per_batch=4, pin_memory=False)
    buf2.load_state_dict(state)
    for t in range(2):  # same content, restored generator -> same draw
        buf2._store(batch(t))
    assert torch.equal(buf2.step(*batch(7))[1], nxt)


def test_store_dtype_and_output_dtype():
    buf = ReplayBuffer(capacity=2, replay_times=2, chunks_per_batch=2, store_dtypes=[torch.float16, None], pin_memory=False)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float32)
    y = torch.arange(4)
    out_x, out_y = buf.step(x, y)
    assert buf.chunk(0, 0).dtype == torch.float16 and buf.chunk(1, 0).dtype == torch.int64
    assert out_x.dtype == torch.float32 and out_x.shape[0] == 8
    # replayed samples are the fp16-rounded fresh ones
    for row, idx in zip(out_x[4:], out_y[4:]):
        torch.testing.assert_close(row, x[idx].half().float())


def test_errors():
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        ReplayBuffer(capacity=0, replay_times=2)
    buf = ReplayBuffer(capacity=2, replay_times=2, chunks_per_batch=32, pin_memory=False)
    with pytest.raises(ValueError, match="loader batch size 8 is not divisible by chunks_per_batch=32"):
        buf.step(*batch(0))
    with pytest.raises(ValueError, match="disagree on batch size"):
        buf.step(torch.zeros(32, 1), torch.zeros(31))


def test_ring_takes_exactly_a_full_buffer_and_refuses_a_new_shape():
    from efficienttrain.replay import buffer_bytes

    buf = ReplayBuffer(capacity=3, replay_times=2, chunks_per_batch=2, store_dtypes=[torch.float16, None],
                       pin_memory=False)
    x = torch.randn(4, 3, 5, 5)
    for t in range(5):
        buf.step(x + t, torch.arange(4) + 10 * t)
        assert buf.allocated_bytes == buffer_bytes(3, 4, (3, 5, 5), 2) + buffer_bytes(3, 4, (), 8)
    assert buf.nbytes == buf.allocated_bytes                     # full: what buffer_bytes reports
    with pytest.raises(ValueError, match=r"loader batch of shape \(4, 3, 6, 6\) after batches of shape \(4, 3, 5, 5\)"):
        buf.step(torch.randn(4, 3, 6, 6), torch.arange(4))
    buf.clear()
    assert buf.allocated_bytes == 0 and len(buf) == 0
