"""serve's micro-batcher on its own: what shares a batch, the queue bound, one bad input, draining on close."""
import threading
import time

import pytest

from captioning.serve.batcher import Batcher, QueueFull


class Recorder:
    """A caption_fn that records each batch (its sources and keywords) and can be held on a gate."""

    def __init__(self, fail_on=None):
        self.batches, self.gate, self.fail_on = [], threading.Event(), fail_on
        self.gate.set()

    def __call__(self, sources, keywords):
        self.gate.wait(30)
        self.batches.append((list(sources), keywords))
        if self.fail_on in sources:
            raise ValueError(f"cannot caption {self.fail_on}")
        return [f"caption of {s}" for s in sources]


def held(recorder, **kwargs):
    """A started batcher whose worker is busy on a first job (so that what is submitted next waits)."""
    recorder.gate.clear()
    batcher = Batcher(recorder, **kwargs).start()
    first = batcher.submit("first", {}, ("greedy",))
    time.sleep(0.05 + kwargs.get("max_batch_delay_s", 0))
    return batcher, first


def test_compatible_requests_share_a_batch_and_others_wait_their_turn():
    recorder = Recorder()
    batcher, first = held(recorder, max_batch_size=3, max_batch_delay_s=0.01)
    greedy, beam = ("greedy",), ("beam", 3)
    jobs = [batcher.submit(name, {"beam_size": 3 if key == beam else 1}, key)
            for name, key in [("a", greedy), ("b", beam), ("c", greedy), ("d", greedy), ("e", greedy), ("f", beam)]]
    recorder.gate.set()
    assert [j.future.result(10) for j in jobs] == [f"caption of {n}" for n in "abcdef"]
    assert first.future.result(10) == "caption of first"
    assert [sources for sources, _ in recorder.batches] == [["first"], ["a", "c", "d"], ["b", "f"], ["e"]]
    assert recorder.batches[2][1] == {"beam_size": 3}
    batcher.close()


def test_sampling_requests_are_never_batched():
    recorder = Recorder()
    batcher, _ = held(recorder, max_batch_size=8)
    jobs = [batcher.submit(name, {"temperature": 1.0, "seed": 1}, None) for name in "xyz"]
    recorder.gate.set()
    [j.future.result(10) for j in jobs]
    assert [sources for sources, _ in recorder.batches[1:]] == [["x"], ["y"], ["z"]]
    batcher.close()


def test_a_lone_request_waits_only_the_batch_delay():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=8, max_batch_delay_s=0.2).start()
    batcher.ready.wait(5)
    start = time.monotonic()
    assert batcher.submit("solo", {}, ("greedy",)).future.result(10) == "caption of solo"
    assert 0.15 < time.monotonic() - start < 5
    batcher.close()


def test_past_the_queue_bound_submit_refuses_at_once_with_a_retry_after():
    recorder = Recorder()
    batcher, _ = held(recorder, max_batch_size=2, max_queue=3)
    waiting = [batcher.submit(str(i), {}, ("greedy",)) for i in range(3)]
    start = time.monotonic()
    with pytest.raises(QueueFull, match="queue is full") as refused:
        batcher.submit("one too many", {}, ("greedy",))
    assert time.monotonic() - start < 0.5 and refused.value.retry_after_s >= 1
    assert batcher.full()
    recorder.gate.set()
    assert [j.future.result(10) for j in waiting] == ["caption of 0", "caption of 1", "caption of 2"]
    assert not batcher.full()
    batcher.close()


def test_a_batch_that_raises_fails_only_the_request_that_broke_it():
    recorder = Recorder(fail_on="bad")
    batcher, _ = held(recorder, max_batch_size=4)
    jobs = {name: batcher.submit(name, {}, ("greedy",)) for name in ("a", "bad", "b")}
    recorder.gate.set()
    assert jobs["a"].future.result(10) == "caption of a" and jobs["b"].future.result(10) == "caption of b"
    with pytest.raises(ValueError, match="cannot caption bad"):
        jobs["bad"].future.result(10)
    batcher.close()


def test_a_forgotten_request_leaves_the_queue_and_close_drains_the_rest():
    recorder = Recorder()
    batcher, first = held(recorder, max_batch_size=1)
    gone, kept = batcher.submit("gone", {}, ("g",)), batcher.submit("kept", {}, ("g",))
    batcher.forget(gone)
    assert batcher.depth == 1 and gone.future.cancelled()
    closing = threading.Thread(target=batcher.close)
    closing.start()
    with pytest.raises(QueueFull, match="stopping"):
        batcher.submit("late", {}, ("g",))
    recorder.gate.set()
    closing.join(10)
    assert kept.future.result(0) == "caption of kept" and first.future.result(0) == "caption of first"
    assert [s for s, _ in recorder.batches] == [["first"], ["kept"]]


def test_the_captioner_in_a_batch_answers_each_image_and_a_bad_one_gets_its_error(tiny_run, shapes_dir):
    """What the server's worker calls: one corrupt image among good ones costs only its own caption."""
    from captioning import Captioner

    captioner = Captioner.from_checkpoint(tiny_run / "best.pt")
    paths = sorted((shapes_dir / "flickr30k_images").iterdir())[:2]
    sources = [paths[0].read_bytes(), b"\x89PNG\r\n\x1a\n broken", paths[1].read_bytes()]
    batcher = Batcher(lambda s, kw: captioner.caption(s, batch_size=len(s), **kw), max_batch_size=3,
                      max_batch_delay_s=0.5).start()
    jobs = [batcher.submit(s, {"beam_size": 2}, ("beam", 2)) for s in sources]
    results = [j.future.result(30) for j in jobs]
    batcher.close()
    assert [r.ok for r in results] == [True, False, True]
    assert "not an image file" in results[1].error
    assert [results[0].caption, results[2].caption] == [captioner.caption(p, beam_size=2)[0].caption for p in paths]
