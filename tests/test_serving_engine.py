"""The continuous-batching engine (esolm.serving.engine) on real tiny models.

The central property: a request decoded by the engine — whatever else is in the batch, joining and leaving
at any step — gives exactly the tokens of ``esolm.generate`` run alone with the same arguments and seed.
"""

import threading

import pytest
import torch

from esolm import DiT, EsoLMError, ModelConfig, UserError
from esolm.sampling.api import generate, sampling_params
from esolm.serving import CompletionRequest, Engine, Finished, QueueFull, StepEvent

V, M, L = 17, 16, 16
ESOLM_B = {"name": "esolm", "variant": "B", "alpha0": 0.5}
AR = {"name": "ar"}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models run faster on one thread than split over shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(adaln: bool = True, dtype: torch.dtype = torch.float64, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, mask_id=M if adaln else None, hidden_size=32, cond_dim=16, n_layers=2,
                      n_heads=2, length=L, adaln=adaln)
    return DiT(cfg).randomize_zero_init(0.5).to(dtype).eval()


class Collector:
    """on_event for every request: events and Finished by request id, tagged with the engine step."""

    def __init__(self):
        self.events: dict[int, list[tuple[int, StepEvent]]] = {}
        self.finished: dict[int, Finished] = {}
        self.step = 0
        self.lock = threading.Lock()

    def __call__(self, e):
        with self.lock:
            if isinstance(e, Finished):
                assert e.request_id not in self.finished
                self.finished[e.request_id] = e
            else:
                self.events.setdefault(e.request_id, []).append((self.step, e))

    def first_step(self, rid: int) -> int:
        return self.events[rid][0][0]

    def last_step(self, rid: int) -> int:
        return self.events[rid][-1][0]


def R(prompt_ids, max_tokens, infill=None, schedule=None, greedy=False, **knobs) -> CompletionRequest:
    """A request with its sampling knobs (``schedule``: the sampler, as the HTTP field is named)."""
    if schedule is not None:
        knobs["sampler"] = schedule
    return CompletionRequest(prompt_ids, max_tokens, sampling_params(None, greedy, **knobs), infill)


def reference(engine: Engine, req: CompletionRequest):
    """``generate`` alone for ``req`` (the prompt as the engine completed it: a BOS for an empty AR prompt)."""
    prompt = engine.check(req).prompt_ids
    return generate(engine.model, engine.method, prompt_ids=[prompt], max_length=len(prompt) + req.max_tokens,
                    params=req.params, eos_id=engine.eos_id, infill=req.infill, bos_id=engine.bos_id), len(prompt)


def assert_alone(engine: Engine, col: Collector, reqs: dict[int, CompletionRequest]) -> int:
    """Every request finished with generate's tokens; its events are its steps 0..nfe-1 and name its tokens.
    Returns how many requests left early (at an EOS, in fewer steps than generate)."""
    early = 0
    for rid, req in reqs.items():
        ref, p = reference(engine, req)
        fin = col.finished[rid]
        assert fin.error is None and fin.finish_reason in ("stop", "length")
        want = ref.tokens[0, p:].tolist()
        assert fin.tokens == want, (rid, fin.tokens, want)
        events = [e for _, e in col.events[rid]]
        assert [e.step for e in events] == list(range(fin.nfe))
        decided = {}
        for e in events:
            assert len(e.positions) == len(e.tokens) and set(e.positions).isdisjoint(decided)
            decided.update(zip(e.positions, e.tokens))
        free = {q for q in range(p, p + req.max_tokens) if q not in (req.infill or {})}
        end = ref.lengths[0].item() if engine.eos_id is not None else p + req.max_tokens
        for q in free:
            if q < end:  # before generate's EOS cut every free position was decided by some event
                assert decided[q] == want[q - p]
        if engine.eos_id is None:
            assert set(decided) == free and fin.nfe == ref.nfe and fin.finish_reason == "length"
        else:
            assert fin.nfe <= ref.nfe
            assert (fin.finish_reason == "stop") == (engine.eos_id in want)
            early += fin.nfe < ref.nfe
    return early


def staggered(engine: Engine, col: Collector, reqs: list[CompletionRequest], waves: list[int]) -> dict:
    """Submit ``reqs`` in waves: ``waves[i]`` more requests, then ``i + 1`` steps; then run to the end."""
    out, it = {}, iter(reqs)
    for i, n in enumerate(waves):
        for _ in range(n):
            req = next(it)
            out[engine.submit(req, col)] = req
        for _ in range(i + 1):
            engine.step()
            col.step += 1
    for req in it:
        out[engine.submit(req, col)] = req
    while engine.step():
        col.step += 1
    return out


ESOLM_MIX = [
    R([1, 2, 3], 10, seed=1, alpha0=1.0, steps=4),
    R([], 16, seed=2, alpha0=0.5, top_p=0.8),
    R([5], 9, seed=3, alpha0=0.25, schedule="first_hitting", temperature=0.6),
    R([4, 4, 4, 4, 4], 11, seed=4, alpha0=0.0),
    R([2, 2], 12, seed=5, alpha0=0.5, schedule="strided", steps=3, infill={6: 7, 9: 1}),
    R([9, 8, 7, 6], 7, seed=6, steps=2, temperature=1.5, top_p=0.95),
    R([3], 15, seed=7, alpha0=0.5, greedy=True),
    R([1], 6, seed=8, alpha0=1.0, schedule="strided", steps=2),
]


@pytest.mark.parametrize("eos_id", [None, 3])
def test_esolm_b_batched_equals_generate_alone(eos_id):
    engine = Engine(tiny(), ESOLM_B, max_batch=3, eos_id=eos_id)
    col = Collector()
    reqs = staggered(engine, col, ESOLM_MIX, [2, 2, 2])
    assert len(col.finished) == len(reqs) and engine.stats["active"] == engine.stats["queued"] == 0
    early = assert_alone(engine, col, reqs)
    assert early > 0 if eos_id is not None else early == 0
    ids = sorted(reqs)
    # requests joined a batch whose other rows were mid-way, and left while others went on
    assert any(col.first_step(a) < col.first_step(b) <= col.last_step(a) for a in ids for b in ids)
    assert any(col.last_step(a) < col.last_step(b) for a in ids for b in ids)
    assert max(sum(col.first_step(r) <= s <= col.last_step(r) for r in ids) for s in range(col.step)) == 3
    phases = {e.phase for r in ids for _, e in col.events[r]}
    assert phases == {"diffusion", "sequential"}


def test_ar_batched_equals_generate_alone_with_eos_exit():
    model = tiny(adaln=False)
    reqs = [R([1, 2, 3], 12, seed=1), R([], 15, seed=2, top_p=0.9),
            R([5], 9, seed=3, temperature=0.7), R([4] * 6, 10, seed=4),
            R([2, 9], 13, seed=5, temperature=1.3, top_p=0.85), R([7], 8, seed=6)]
    plain = Engine(model, AR, bos_id=0)
    # an EOS that request 0 draws early (generate's tokens before the first EOS do not depend on eos_id)
    eos = reference(plain, reqs[0])[0].tokens[0, 4].item()
    engine = Engine(model, AR, max_batch=3, eos_id=eos, bos_id=0)
    col = Collector()
    ids = staggered(engine, col, reqs, [3, 2])
    assert_alone(engine, col, ids)
    fin = col.finished[0]
    assert fin.finish_reason == "stop" and fin.nfe <= 2 < reqs[0].max_tokens  # left the batch at its EOS
    assert {e.phase for evs in col.events.values() for _, e in evs} == {"sequential"}
    # token 0 as EOS and BOS (0 is also what fills an AR row's undecided positions)
    engine, col = Engine(model, AR, max_batch=3, eos_id=0, bos_id=0), Collector()
    assert_alone(engine, col, staggered(engine, col, reqs, [3, 2]))


@pytest.mark.parametrize("adaln", [True, False], ids=["esolm_b", "ar"])
def test_float32_batched_equals_generate_alone(adaln):
    method = ESOLM_B if adaln else AR
    engine = Engine(tiny(adaln, torch.float32), method, max_batch=2, bos_id=0)
    col = Collector()
    mix = [R([1, 2], 12, seed=11, top_p=0.9), R([], 14, seed=12, temperature=0.8),
           R([6, 6, 6], 8, seed=13), R([5], 11, seed=14)]
    if adaln:
        mix[2] = R([6, 6, 6], 8, seed=13, alpha0=0.0)
        mix[3] = R([5], 11, seed=14, schedule="strided", steps=3)
    assert_alone(engine, col, staggered(engine, col, mix, [2, 1]))


def test_one_network_call_per_step():
    model = tiny()
    engine = Engine(model, ESOLM_B, max_batch=4)
    calls = []
    hook = model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        col = Collector()
        storage = [t.data_ptr() for t in engine._cache.k + engine._cache.v]
        reqs = {engine.submit(r, col): r for r in ESOLM_MIX[:4]}
        steps = 0
        while engine.step():
            steps += 1
    finally:
        hook.remove()
    assert storage == [t.data_ptr() for t in engine._cache.k + engine._cache.v]  # preallocated, reused
    nfe = [reference(engine, r)[0].nfe for r in reqs.values()]
    assert steps == max(nfe) == len(calls) == engine.stats["steps"]
    assert engine.stats["nfe"] == sum(nfe) and calls[0] == 4  # every request in the first call
    assert_alone(engine, col, reqs)


def test_cancel_frees_the_slot_at_the_next_step():
    engine = Engine(tiny(), ESOLM_B, max_batch=1)
    col = Collector()
    long = R([1], 15, seed=1, alpha0=0.0)
    a, b = engine.submit(long, col), engine.submit(ESOLM_MIX[0], col)
    engine.step()
    col.step += 1
    engine.cancel(a)
    assert engine.step()
    assert col.finished[a].finish_reason == "cancelled" and col.finished[a].nfe == 1
    assert col.first_step(b) == 1  # admitted into the freed slot by that very step
    c, d = engine.submit(ESOLM_MIX[2], col), engine.submit(ESOLM_MIX[3], col)
    engine.cancel(d)  # still queued: never decoded
    engine.cancel(12345)  # unknown ids are ignored
    engine.run_until_idle()
    assert col.finished[d].finish_reason == "cancelled" and d not in col.events
    assert_alone(engine, col, {b: ESOLM_MIX[0], c: ESOLM_MIX[2]})


def test_a_raising_callback_fails_only_its_request():
    engine = Engine(tiny(), ESOLM_B, max_batch=3)
    col = Collector()
    finished = {}

    def bad(e):
        if isinstance(e, Finished):
            finished["bad"] = e
        elif e.step == 1:
            raise RuntimeError("client went away")

    good = {engine.submit(r, col): r for r in ESOLM_MIX[:2]}
    rid = engine.submit(ESOLM_MIX[2], bad)
    good[engine.submit(ESOLM_MIX[3], col)] = ESOLM_MIX[3]
    engine.run_until_idle()
    fin = finished["bad"]
    assert fin.request_id == rid and fin.finish_reason == "error" and "client went away" in fin.error
    assert_alone(engine, col, good)


def test_queue_full():
    engine = Engine(tiny(), ESOLM_B, max_batch=1, max_queue=2)
    col = Collector()
    req = R([1], 4)
    engine.submit(req, col)
    engine.submit(req, col)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(req, col)
    assert issubclass(QueueFull, EsoLMError) and engine.stats["queued"] == 2
    engine.step()  # one admitted: room again
    engine.submit(req, col)
    engine.run_until_idle()
    assert len(col.finished) == 3


def test_shutdown_drains_from_a_background_thread():
    engine = Engine(tiny(), ESOLM_B, max_batch=2, eos_id=3)
    col = Collector()
    engine.start()
    reqs = {engine.submit(r, col): r for r in ESOLM_MIX[:5]}
    engine.shutdown(drain=True, timeout=120)
    assert not engine._thread.is_alive()
    assert_alone(engine, col, reqs)
    with pytest.raises(UserError, match="shutting down"):
        engine.submit(ESOLM_MIX[0], col)


def test_concurrent_clients_get_their_own_tokens():
    engine = Engine(tiny(), ESOLM_B, max_batch=3, eos_id=3)
    engine.start()
    col, reqs, lock = Collector(), {}, threading.Lock()

    def client(req):
        rid = engine.submit(req, col)
        with lock:
            reqs[rid] = req

    threads = [threading.Thread(target=client, args=(r,)) for r in ESOLM_MIX]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.shutdown(drain=True, timeout=120)
    assert len(reqs) == len(ESOLM_MIX)
    assert_alone(engine, col, reqs)


def test_shutdown_without_drain_cancels():
    engine = Engine(tiny(), ESOLM_B, max_batch=2)
    col = Collector()
    ids = [engine.submit(r, col) for r in ESOLM_MIX[:4]]
    engine.step()
    engine.shutdown(drain=False)
    assert [col.finished[i].finish_reason for i in ids] == ["cancelled"] * 4
    assert engine.stats["active"] == engine.stats["queued"] == 0


@pytest.mark.parametrize("method", [{"name": "esolm", "variant": "A", "alpha0": 0.5}, {"name": "mdlm"},
                                    {"name": "bd3lm", "block_size": 4}], ids=["esolm_a", "mdlm", "bd3lm"])
def test_one_at_a_time_methods_equal_generate(method):
    engine = Engine(tiny(), method, max_batch=3, eos_id=3)
    col = Collector()
    reqs = [R([1, 2, 3, 4], 8, seed=1, steps=3),
            R([5], 7, seed=2, top_p=0.9, temperature=0.8, schedule="first_hitting")]
    ids = {engine.submit(r, col): r for r in reqs}
    engine.run_until_idle()
    assert_alone(engine, col, ids)


def test_nothing_to_decode_finishes_at_admission():
    engine = Engine(tiny(), ESOLM_B, max_batch=2, eos_id=3)
    col = Collector()
    given = engine.submit(R([1], 2, infill={1: 5, 2: 6}), col)
    after_eos = engine.submit(R([1], 5, infill={1: 3}), col)
    engine.run_until_idle()
    assert col.finished[given].tokens == [5, 6] and col.finished[given].nfe == 0
    assert col.finished[given].finish_reason == "length"
    assert col.finished[after_eos].tokens == [3] * 5 and col.finished[after_eos].nfe == 0
    assert col.finished[after_eos].finish_reason == "stop" and engine.stats["steps"] == 0
    ref, _ = reference(engine, R([1], 5, infill={1: 3}))
    assert ref.tokens[0, 1:].tolist() == [3] * 5


def test_slot_causal_is_the_cached_step_per_row():
    from esolm.model import masks

    for cache_len, n in [(0, 3), (4, 1), (5, 4)]:
        slots = torch.arange(cache_len, cache_len + n)[None]
        assert torch.equal(masks.slot_causal(slots, cache_len + n), masks.cached_step(cache_len, n))


def test_slot_bytes():
    engine = Engine(tiny(), ESOLM_B, max_batch=3)
    assert engine.slot_bytes == 2 * 2 * (L + 1) * 32 * 8  # K and V, 2 layers, L + 1 scratch slots, hidden 32, float64


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_ids=[1] * 10, max_tokens=7), "exceeds the model length 16"),
    (dict(prompt_ids=[1], max_tokens=0), r"max_tokens must be an integer in \[1, 16\]"),
    (dict(prompt_ids=[1, 17], max_tokens=2), "prompt token id"),
    (dict(prompt_ids="hello", max_tokens=2), "list of token ids"),
    (dict(prompt_ids=[1], max_tokens=2, top_p=0.0), "top_p"),
    (dict(prompt_ids=[1], max_tokens=2, temperature=-1), "temperature"),
    (dict(prompt_ids=[1], max_tokens=2, alpha0=1.5), "alpha0"),
    (dict(prompt_ids=[1], max_tokens=2, steps=0), "steps"),
    (dict(prompt_ids=[1], max_tokens=2, schedule="beam"), "sampler 'beam'"),
    (dict(prompt_ids=[1, 2], max_tokens=4, infill={1: 3}), "inside the prompt"),
    (dict(prompt_ids=[1], max_tokens=4, infill={3: M}), "mask id"),
    (dict(prompt_ids=[1], max_tokens=2, greedy="yes"), "greedy"),
])
def test_check_refuses_bad_requests(kwargs, message):
    engine = Engine(tiny(), ESOLM_B)
    with pytest.raises(UserError, match=message) as err:
        engine.submit(R(**kwargs), Collector())
    assert "\n" not in str(err.value) and engine.stats["queued"] == 0


def test_check_ar_needs_a_start_token():
    with pytest.raises(UserError, match="needs a prompt"):
        Engine(tiny(adaln=False), AR).check(R([], 4))
    assert Engine(tiny(adaln=False), AR, eos_id=5).check(R([], 4)).prompt_ids == [5]
    with pytest.raises(UserError, match="alpha0 applies to Eso-LM only"):
        Engine(tiny(adaln=False), AR).check(R([1], 4, alpha0=0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draw_segments_is_draw_per_segment(dtype):
    """One batched draw over many requests' logits (mixed temperatures, nucleus thresholds and greedy rows,
    segments of different lengths, tied logits) gives each segment draw's tokens with that segment's
    generator alone, and leaves every generator where draw leaves it."""
    from esolm.sampling.draw import draw, draw_segments

    rng = torch.Generator().manual_seed(0)
    counts = [3, 1, 4, 2, 5, 1, 3]
    top_p = [None, 0.9, 0.5, None, 0.99, 0.3, 0.8]
    temperature = [1.0, 0.7, 1.0, 1.6, 0.9, 1.0, 2.0]
    greedy = [False, False, True, False, False, True, False]
    for trial in range(4):
        logits = (3 * torch.randn(sum(counts), 40, generator=rng)).round().to(dtype)  # many ties
        if trial == 1:
            greedy = [True] * len(counts)
        if trial == 2:
            greedy = [False] * len(counts)
        if trial == 3:
            top_p = [0.6] * len(counts)
        gens = [torch.Generator().manual_seed(100 + j) for j in range(len(counts))]
        got = draw_segments(logits, counts, 7, top_p, temperature, greedy, gens)
        a = 0
        for j, c in enumerate(counts):
            alone = torch.Generator().manual_seed(100 + j)
            want = draw(logits[a:a + c][None], 7, top_p[j], alone, greedy[j], temperature[j])[0]
            assert torch.equal(got[a:a + c], want), (trial, j)
            assert torch.equal(gens[j].get_state(), alone.get_state())
            a += c
        assert not (got == 7).any()


def tiny_llama(dtype: torch.dtype = torch.float64, shifted: bool = False):
    """A random Llama-family backbone (grouped KV heads, no time conditioning) with the same vocabulary; queried
    with the DiT's convention unless ``shifted``."""
    from esolm.model.llama import EsoLlama, EsoLlamaConfig

    torch.manual_seed(0)
    cfg = EsoLlamaConfig(base_vocab_size=M, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, length=L, shifted=shifted)
    model = EsoLlama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.mark.parametrize("method", [ESOLM_B, AR], ids=["esolm_b", "ar"])
def test_llama_backbone_batched_equals_generate_alone(method):
    """The engine is backbone-agnostic: its slot cache takes the backbone's KV layout (2 KV heads for 4 query
    heads here) and no time conditioning; every request still gets generate's tokens alone."""
    model = tiny_llama()
    assert model.kv_layout() == (2, 2, 8) and model.frozen_conditioning(1) is None
    engine = Engine(model, method, max_batch=3, bos_id=0)
    assert engine.slot_bytes == 2 * 2 * 2 * (L + 1) * 8 * 8  # K and V, 2 layers, 2 KV heads, L + 1 slots, float64
    col = Collector()
    mix = ESOLM_MIX if method is ESOLM_B else [R([1, 2, 3], 12, seed=1), R([], 15, seed=2, top_p=0.9),
                                                R([5], 9, seed=3, temperature=0.7), R([4] * 6, 10, seed=4)]
    reqs = staggered(engine, col, mix, [2, 2])
    assert len(col.finished) == len(reqs)
    assert_alone(engine, col, reqs)


def test_shifted_llama_esolm_runs_whole_requests_with_generates_tokens():
    """Eso-LM (B) on a network under the shifted query convention is decoded request by request through generate
    (its query rows are not the batched engine's one-row steps), with generate's tokens; AR on it stays batched.
    A request with no prompt starts from the BOS (position 0 is the given start token)."""
    model = tiny_llama(shifted=True)
    engine = Engine(model, ESOLM_B, max_batch=3, bos_id=0)
    assert not engine.batched and Engine(model, AR, max_batch=3, bos_id=0).batched
    col = Collector()
    mix = [r for r in ESOLM_MIX if r.prompt_ids][:3] + [R([], 9, seed=7, alpha0=0.5, steps=3)]
    reqs = staggered(engine, col, mix, [2, 2])
    assert len(col.finished) == len(reqs)
    for rid, req in reqs.items():
        ref, p = reference(engine, req)
        assert col.finished[rid].error is None and col.finished[rid].tokens == ref.tokens[0, p:].tolist()
