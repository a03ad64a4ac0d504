"""How many threads contexts made with ``n_threads="auto"`` use: measured, not guessed
(mullama.native._compute.ThreadChoice). The policy is checked with step times given to it; the
contexts are real, and their thread counts are read back from llama.cpp (``llama_n_threads``)."""

from __future__ import annotations

import itertools

import pytest
from test_engine import read_all

import mullama
from mullama import StreamConfig
from mullama.generate._engine import Engine
from mullama.native import _library
from mullama.native._compute import ThreadChoice, available_threads

MS = 0.001


def idle() -> float:
    """The load average of an idle machine."""
    return 0.0


def feed(choice: ThreadChoice, seconds_for: dict[int, float], steps: int) -> list[int]:
    """Run ``steps`` token steps, each taking what ``seconds_for`` says for the count it ran with;
    the counts they ran with."""
    used, count = [], choice.current
    for _ in range(steps):
        used.append(count)
        count = choice.record(seconds_for[count], 1)
    return used


def runs_of(count: int, used: list[int]) -> list[int]:
    """The lengths of the runs of consecutive steps on ``count`` threads."""
    return [len(list(run)) for value, run in itertools.groupby(used) if value == count]


def test_it_starts_on_one_thread_and_moves_to_all_cores_when_they_are_faster():
    choice = ThreadChoice(2, idle)
    assert choice.candidates == (2, 1) and choice.current == 1
    used = feed(choice, {2: 4 * MS, 1: 7 * MS}, 4000)
    assert used[:ThreadChoice.FIRST_PROBE] == [1] * ThreadChoice.FIRST_PROBE
    assert choice.current == 2 and choice.estimates == {2: pytest.approx(4 * MS), 1: pytest.approx(7 * MS)}
    # Once on two threads, one is tried again after 512 steps, then 1024, 2048: the probes spread out.
    probes = [i for i in range(1, len(used)) if used[i] == 1 and used[i - 1] == 2]
    assert len(probes) >= 3
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]
    assert used.count(1) < 100  # of 4000 steps


def test_one_thread_stays_when_it_is_faster():
    choice = ThreadChoice(2, idle)
    used = feed(choice, {2: 40 * MS, 1: 10 * MS}, 600)
    assert choice.current == 1 and used[-1] == 1 and choice.probes >= 1


def test_a_count_less_than_the_margin_faster_does_not_replace_the_current_one():
    choice = ThreadChoice(2, idle)
    feed(choice, {2: 9.5 * MS, 1: 10 * MS}, 100)
    assert choice.current == 1 and choice.probes == 1


def test_a_probe_of_a_much_slower_count_ends_early():
    """Under load a step of two threads took 3 s against 16 ms for one: a probe of them stops as
    soon as it has cost what a whole probe of the current count would."""
    choice = ThreadChoice(2, idle)
    runs = runs_of(2, feed(choice, {2: 40 * MS, 1: 10 * MS}, 4000))
    assert len(runs) >= 3 and max(runs) == 3  # 120 ms > a probe's 8 x 10 ms: 3 steps, not 9
    runs = runs_of(2, feed(choice, {2: 10_000 * MS, 1: 10 * MS}, 9000))
    assert runs and max(runs) == 1


def test_more_threads_are_not_tried_while_other_work_takes_the_cores():
    load = [1.05]  # this stream's own thread: one core free
    choice = ThreadChoice(2, lambda: load[0])
    feed(choice, {2: 4 * MS, 1: 7 * MS}, ThreadChoice.FIRST_PROBE + ThreadChoice.PROBE_STEPS + 2)
    assert choice.current == 2  # tried and kept
    load[0] = 4.0  # other processes came; two threads now measured slower
    used = feed(choice, {2: 40 * MS, 1: 10 * MS}, 1200)
    assert choice.current == 1  # one thread is always tried
    assert runs_of(2, used[used.index(1):]) == []  # and two are not tried again while the load stays


def test_larger_machines_also_try_half_the_cores():
    assert ThreadChoice(8, idle).candidates == (8, 4, 1)
    choice = ThreadChoice(1, idle)
    assert choice.candidates == (1,)
    assert feed(choice, {1: MS}, 50) == [1] * 50 and choice.probes == 0


@pytest.fixture()
def compute():
    compute = _library.get().compute
    if available_threads() < 2:
        pytest.skip("this machine gives the process one CPU: there is no thread count to choose")
    compute.reset_threads(ThreadChoice(available_threads(), idle))  # a busy machine would not try more threads
    yield compute
    compute.reset_threads()


def threads_of(ctx) -> tuple[int, int]:
    lib = _library.get().lib
    return lib.llama_n_threads(ctx.ptr), lib.llama_n_threads_batch(ctx.ptr)


def record_steps(compute, seconds_for: dict[int, float], steps: int) -> None:
    """Report ``steps`` token steps, each taking what ``seconds_for`` says for the count applied."""
    with compute.lock:  # where decodes report them
        for _ in range(steps):
            compute.record(seconds_for[compute._applied], 1)


def test_contexts_without_a_thread_count_follow_the_choice_and_others_keep_theirs(model, compute):
    most = available_threads()
    with mullama.Context(model, n_ctx=256, n_threads="auto") as adaptive, \
            mullama.Context(model, n_ctx=256, n_threads=1) as fixed:
        assert threads_of(adaptive) == threads_of(fixed) == (1, 1)
        record_steps(compute, {most: 10 * MS, 1: 40 * MS}, 60)  # all cores measured four times faster
        assert compute.threads.current == most
        assert threads_of(adaptive) == (most, most) and threads_of(fixed) == (1, 1)
        with mullama.Context(model, n_ctx=256, n_threads="auto") as later:
            assert threads_of(later) == (most, most)
        compute.reset_threads(ThreadChoice(most, idle))
        assert threads_of(adaptive) == (1, 1)


def test_greedy_output_of_a_short_prompt_is_the_same_while_the_thread_count_changes(model, compute):
    """Token steps of an "auto" context are timed; the probes switch the count mid-generation, and the
    tokens equal those of fixed counts here. (Not in general: llama.cpp's sums depend on the thread
    count, which is why "auto" is not the default; see test_the_default_is_all_cores.)"""
    prompt = "The history of the printing press"
    config = dict(max_tokens=48, temperature=0, ignore_eos=True, timeout_ms=None)
    with mullama.Context(model, n_ctx=256, n_threads="auto") as ctx:
        adaptive = ctx.generate(prompt, **config).token_ids
    assert compute.threads.probes >= 1 and set(compute.threads.estimates) == {available_threads(), 1}
    for n in (1, available_threads()):
        with mullama.Context(model, n_ctx=256, n_threads=n) as fixed:
            assert fixed.generate(prompt, **config).token_ids == adaptive


def test_the_engine_reports_its_token_steps(model, compute):
    with Engine(model, parallel=2, n_ctx=256, n_threads="auto") as engine:
        request = engine.submit(model.tokenize("Once upon a time"),
                                StreamConfig(max_tokens=40, temperature=0, ignore_eos=True, timeout_ms=None))
        assert len(read_all(request)) == 40
    assert compute.threads.probes >= 1 and set(compute.threads.estimates) == {available_threads(), 1}


def test_the_default_is_all_cores_and_auto_is_asked_for(model, compute, monkeypatch):
    """Greedy output depends on the thread count (llama.cpp splits some sums across threads: a restored
    prompt cache gave other tokens on one thread than llama-server -t 2 at the 11th token), so the
    default is fixed, like llama-server's, and measuring is asked for with "auto"."""
    monkeypatch.delenv("MULLAMA_THREADS", raising=False)  # (the suite runs on one thread: conftest.py)
    with mullama.Context(model, n_ctx=256) as default:
        record_steps(compute, {available_threads(): 40 * MS, 1: 10 * MS}, 60)
        assert threads_of(default) == (available_threads(), available_threads())
    with pytest.raises(mullama.InvalidConfigError, match="n_threads"):
        mullama.Context(model, n_ctx=256, n_threads="fast")


def test_mullama_threads_sets_the_default_count(model, compute, monkeypatch):
    """MULLAMA_THREADS puts a whole process (and the servers and scripts it starts) on one count."""
    monkeypatch.setenv("MULLAMA_THREADS", "1")
    with mullama.Context(model, n_ctx=256) as ctx:
        assert threads_of(ctx) == (1, 1)
    with mullama.Context(model, n_ctx=256, n_threads=available_threads()) as asked:
        assert threads_of(asked) == (available_threads(), available_threads())  # a count asked for wins
    for wrong in ("0", "two", "-1", "100000"):
        monkeypatch.setenv("MULLAMA_THREADS", wrong)
        with pytest.raises(mullama.InvalidConfigError, match="MULLAMA_THREADS must be a whole number"):
            mullama.Context(model, n_ctx=256)
