"""The authors' scaling family (``s-sahoo/scaling-dllms``, ``nvidia/SDLLM-*``) loads as esolm models and computes
what the authors' code computes: fixtures written by their code (``tests/fixtures/scaling``, PROVENANCE.md)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esolm.cli import main
from esolm.data.tokenizers import get_tokenizer, tiktoken_json_tokenizer
from esolm.errors import CheckpointError
from esolm.io import load_model
from esolm.model import masks
from esolm.model.backbone import DiT

HERE = Path(__file__).resolve().parent / "fixtures" / "scaling"
# float32 outputs of their code (eager flex_attention) against ours (other kernels, other summation orders)
RTOL = 1e-5
NEG = -1e6


def close(got, ref, msg=""):
    tol = RTOL * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol, msg


def ref(name):
    return load_file(str(HERE / f"reference_{name}.safetensors"))


def esolm_config():
    return json.loads((HERE / "esolm" / "esolm_config.json").read_text())


@pytest.fixture(scope="module")
def eso():
    return load_model(HERE / "esolm", config=esolm_config())


def test_mdlm_folder_loads_and_reproduces_logits():
    lm = load_model(HERE / "mdlm")
    cfg = lm.model.config
    assert lm.method.name == "mdlm" and cfg.adaln and cfg.mask_id == 100  # TinyLlama: mask appended
    r = ref("mdlm")
    with torch.no_grad():
        close(lm.model(r["xt"]), r["logits"])


def test_ar_folder_keeps_adaln_and_the_mask_and_reproduces_logits():
    lm = load_model(HERE / "ar")
    cfg = lm.model.config
    assert lm.method.name == "ar" and cfg.adaln and cfg.mask_id == 3  # the tiktoken <mask>, suppressed in sampling
    r = ref("ar")
    with torch.no_grad():
        close(lm.model(r["x"], mask=masks.causal(r["x"].shape[1])), r["logits"])


def test_ar_kv_cached_generation_matches_every_step():
    lm = load_model(HERE / "ar")
    model, r = lm.model, ref("ar")
    tokens, steps = r["cached.tokens"], r["cached.step_logits"]
    cache = model.new_cache(tokens.shape[1])
    for i in range(steps.shape[0]):
        with torch.no_grad():
            logits = model(tokens[:, i:i + 1], positions=torch.full((tokens.shape[0], 1), i),
                           mask=masks.cached_step(cache.length, 1), cache=cache, commit=1)[:, -1]
        close(logits, steps[i], f"step {i}")
        logits[:, 3] = NEG
        assert torch.equal(logits.argmax(-1), tokens[:, i + 1]), f"step {i}"


def test_ar_greedy_sampler_gives_the_authors_tokens():
    from esolm.sampling.api import generate
    from esolm.sampling.params import SamplingParams

    lm = load_model(HERE / "ar")
    tokens = ref("ar")["cached.tokens"]
    out = generate(lm.model, lm.method, 1, prompt_ids=[1], params=SamplingParams(temperature=0.0))
    assert torch.equal(out.tokens[0], tokens[0])


def test_bare_esolm_config_is_eso_lm_b_with_the_stored_mask(eso):
    assert eso.method.name == "esolm" and eso.method.variant == "B" and eso.method.alpha0 == 1.0
    assert eso.model.config.mask_id == 3 and eso.model.config.vocab_size == 101


def test_esolm_diffusion_and_sequential_logits(eso):
    r, model = ref("esolm"), eso.model
    zt, pos = r["diffusion.zt_sorted"], r["diffusion.sort_idx"]
    with torch.no_grad():
        close(model(zt, positions=pos, mask=masks.causal(zt.shape[1])), r["diffusion.logits"])
    zt, x0, pos = r["sequential.zt_sorted"], r["sequential.x0_sorted"], r["sequential.sort_idx"]
    n = zt.shape[1]
    with torch.no_grad():
        logits = model(torch.cat([zt, x0], 1), positions=torch.cat([pos, pos], 1), mask=masks.sequential(n))
    close(logits[:, :n], r["sequential.logits"])


def test_esolm_kv_cached_generation_matches_every_step(eso):
    """Each step through esolm's KV cache (the tokens decoded at the previous step committed, this step's masks
    queried) gives the authors' ``forward_sample(kv_cache=True)`` logits, and greedy gives their tokens."""
    r, model = ref("esolm"), eso.model
    tokens, order, counts = r["cached.tokens_sorted"], r["cached.sort_idx"], r["cached.unmask_per_step"].tolist()
    cache = model.new_cache(tokens.shape[1])
    prev = start = 0
    for k, n in enumerate(counts):
        end = start + n
        new = torch.cat([tokens[:, prev:start], torch.full_like(tokens[:, start:end], 3)], 1)
        with torch.no_grad():
            logits = model(new, positions=order[:, prev:end], mask=masks.cached_step(cache.length, end - prev),
                           cache=cache, commit=start - prev)[:, start - prev:]
        close(logits, r["cached.step_logits"][:, start:end], f"step {k}")
        logits[..., 3] = NEG
        assert torch.equal(logits.argmax(-1), tokens[:, start:end]), f"step {k}"
        prev, start = start, end


def test_esolm_sampler_reproduces_the_authors_steps(eso):
    from esolm.sampling import Plan, sample_esolm_b

    r = ref("esolm")
    order, counts = r["cached.sort_idx"], r["cached.unmask_per_step"].tolist()
    b, length = order.shape
    got = []
    x = torch.full((b, length), 3, dtype=torch.long)
    out = sample_esolm_b(eso.model, x, Plan(order, counts, n_given=0, n_diffusion=length), greedy=True,
                         step_callback=lambda k, lo, hi, logits, tokens: got.append(logits.clone()))
    assert out.nfe == len(counts)
    start = 0
    for k, (mine, n) in enumerate(zip(got, counts)):
        close(mine[..., [i for i in range(101) if i != 3]],
              r["cached.step_logits"][:, start:start + n][..., [i for i in range(101) if i != 3]], f"step {k}")
        start += n
    assert torch.equal(out.tokens.gather(1, order), r["cached.tokens_sorted"])


# -- tokenizers ------------------------------------------------------------------------------------------------------

def test_tiktoken_vocabulary_gives_the_authors_ids():
    exp = json.loads((HERE / "tiny_tiktoken_expected.json").read_text())
    tok = tiktoken_json_tokenizer(HERE / "tiny_tiktoken.vocab.json", vocab_size=exp["vocab_size"],
                                  num_special_tokens=exp["num_special_tokens"])
    assert tok.vocab_size == exp["vocab_size"]
    sp = exp["specials"]
    assert (tok.mask_id, tok.bos_id, tok.eos_id, tok.token_to_id("<unk>")) == (sp["mask"], sp["bos"], sp["eos"],
                                                                                sp["unk"])
    for text, ids, decoded in zip(exp["texts"], exp["ids"], exp["decoded"]):
        assert tok.encode_text(text) == ids, text
        assert tok.decode(ids) == decoded


def test_tiktoken_vocabulary_by_path_in_the_authors_layout():
    """get_tokenizer(file) builds their 131,072-id layout: this small file is too short for it, one line."""
    with pytest.raises(CheckpointError, match="entries but a vocabulary of 131,072"):
        get_tokenizer(HERE / "tiny_tiktoken.vocab.json")


@pytest.mark.parametrize("content, msg", [
    ("{}", "expected a JSON list"),
    ("[{\"rank\": 0, \"token_bytes\": \"AA==\"}]", "exactly rank, token_bytes, token_str"),
    ("[{\"rank\": 1, \"token_bytes\": \"AA==\", \"token_str\": \"\"}]", "ranks must be 0, 1, 2"),
    ("[{\"rank\": 0, \"token_bytes\": \"AQ==\", \"token_str\": \"\"}]", "the single byte 0"),
    ("[{\"rank\": 0, \"token_bytes\": \"!!\", \"token_str\": \"\"}]", "not base64"),
    ("[", "unreadable JSON"),
])
def test_bad_tiktoken_vocabularies_are_one_line(tmp_path, content, msg):
    f = tmp_path / "v.json"
    f.write_text(content)
    with pytest.raises(CheckpointError, match=msg) as e:
        tiktoken_json_tokenizer(f, vocab_size=None, num_special_tokens=4)
    assert "\n" not in str(e.value)


# -- folders ---------------------------------------------------------------------------------------------------------

def copy_folder(name, tmp_path, dest="m"):
    out = tmp_path / dest
    shutil.copytree(HERE / name, out)
    return out


def test_bare_config_with_an_unknown_shape_asks_for_config(tmp_path):
    with pytest.raises(CheckpointError, match="number of heads is unknown; pass config=") as e:
        load_model(HERE / "esolm")
    assert "\n" not in str(e.value)


def test_bare_config_reads_the_architecture_from_the_weights_for_the_authors_sizes(tmp_path):
    """A bare config.json of one of their model sizes (hidden 256, 6 blocks: their 6M) needs nothing else."""
    from esolm.config import ModelConfig

    cfg = ModelConfig(vocab_size=40, mask_id=3, hidden_size=256, cond_dim=8, n_layers=6, n_heads=4, length=16)
    folder = tmp_path / "SDLLM-MDLM-tiny"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in DiT(cfg).state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"vocab_size": 40}))
    lm = load_model(folder)  # the method from the folder's name
    got = lm.model.config
    assert (got.hidden_size, got.n_layers, got.n_heads, got.cond_dim, got.length) == (256, 6, 4, 8, 1024)
    assert lm.method.name == "mdlm" and got.mask_id == 39


@pytest.mark.parametrize("edit, msg", [
    (lambda c: {**c, "mask_index": 500}, "mask_index 500 is not an id"),
    (lambda c: {**c, "vocab_size": 102}, "vocab_embed.embedding"),
    (lambda c: {**c, "algo": {**c["algo"], "name": "duo_base"}}, "'duo_base' is not supported"),
    (lambda c: {**c, "model": {**c["model"], "n_heads": 3}}, "n_heads"),
])
def test_bad_folders_are_one_line_checkpoint_errors(tmp_path, edit, msg):
    folder = copy_folder("mdlm", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(CheckpointError, match=msg) as e:
        load_model(folder)
    assert "\n" not in str(e.value)


def test_bare_dit_config_without_a_telling_name_asks_for_the_method(tmp_path):
    from esolm.errors import UserError

    folder = copy_folder("mdlm", tmp_path)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 101}))
    with pytest.raises((UserError, CheckpointError)):
        load_model(folder)


# -- the four surfaces on a scaled-down model in the Hub layout --------------------------------------------------------

@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A random Eso-LM in exactly the Hub layout (the authors' full config.json, model.safetensors) with its
    vocabulary in their tokenizer format beside it (the 1000 specials + the tiny vocabulary)."""
    folder = tmp_path_factory.mktemp("scaling") / "SDLLM-EsoLM-tiny"
    folder.mkdir()
    exp = json.loads((HERE / "tiny_tiktoken_expected.json").read_text())
    vocab = exp["vocab_size"]
    cfg = {**esolm_config(), "vocab_size": vocab, "mask_index": 3}
    cfg["model"] = {**cfg["model"], "length": 64}
    (folder / "config.json").write_text(json.dumps(cfg))
    from esolm.io import scaling

    model_cfg = scaling.config_from_scaling(cfg, {}, "hub")
    torch.manual_seed(0)
    model = DiT(model_cfg).randomize_zero_init(0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    # their vocabulary file, read in their 131,072 layout: grow the tiny file to the size the config says
    shutil.copy(HERE / "tiny_tiktoken.vocab.json", folder / "tokenizer.vocab.json")
    return folder


def test_hub_folder_carries_its_tiktoken_tokenizer(hub_folder):
    lm = load_model(hub_folder)
    assert lm.tokenizer is not None and lm.tokenizer.mask_id == 3 and lm.tokenizer.vocab_size == 1656


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_sample_and_eval(hub_folder, tmp_path, capsys):
    rc, out, err = run(["sample", hub_folder, "--num-samples", 1, "--steps", 4, "--seed", 0], capsys)
    assert rc == 0, err
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(f"Document {i}: hello world, this is test number {i}. " * 3 for i in range(8)) + "\n")
    rc, out, err = run(["eval", hub_folder, "--data", data, "--val-fraction", 0.5, "--max-documents", 4,
                        "--batch-size", 2], capsys)
    assert rc == 0, err
    assert "NELBO" in out


def test_serve_answers_a_completion(hub_folder):
    from test_server import HTTP, start_serve, stop

    proc, url = start_serve(hub_folder)
    try:
        r = HTTP.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["choices"][0]["text"], str)
    finally:
        stop(proc)


def test_lm_eval_runs(hub_folder, capsys):
    pytest.importorskip("lm_eval")
    from esolm.integrations import TASKS_DIR

    rc = main(["lm-eval", "--model", "esolm", "--model_args", f"pretrained={hub_folder},mc_num=2",
               "--tasks", "esolm_wiki_choice", "--include_path", str(TASKS_DIR), "--limit", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "esolm_wiki_choice" in out
