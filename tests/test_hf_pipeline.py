"""transformers models through the whole pipeline, and every kind of model object a user may pass.

- every kind of model object (PreTrainedModel with its tokenizer given or found, SAELens's HookedProxyLM,
  TransformerLens's TransformerBridge and HookedTransformer) is cached in eval mode and comes back as it was: the
  user's own hooks (torch and TransformerLens ones) still in place and firing, its training flags, its device;
- `python -m sae_cache hooks MODEL` lists hook names with their widths for both kinds, exit 2 on bad input;
- SAELens trains from a cache made by the CLI with model_class_name="AutoModelForCausalLM", reading our rows;
- targeted caching of right-padded, masked prompts equals unbatched passes; the shuffle (rows, and positions across
  sequences) permutes the unshuffled cache; concurrent forward threads give the cache of one; an interrupted run
  resumes to the same bytes; torchrun-style ranks cache the same rows as one process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from hf_fixtures import CONTEXT, D_MODEL, HOOKS, ROWS, build_tokenizer, cache_options, load, save_model, texts

pytest.importorskip("sae_lens")

from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig  # noqa: E402
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner  # noqa: E402
from sae_lens.load_model import load_model as saelens_load_model  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig, cli  # noqa: E402
from sae_cache.model import PROBE_SHAPE  # noqa: E402
from sae_cache.targeted import TargetedCacheConfig, cache_targeted  # noqa: E402

GPT2_RESID = HOOKS["gpt2"]["resid"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    return {kind: save_model(kind, tmp_path_factory.mktemp(kind)) for kind in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def text() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts(400)})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def run(model_dir: Path, out: Path, hooks, data, model=None, **overrides) -> dict[str, torch.Tensor]:
    cfg = CacheActivationsRunnerConfig(**cache_options(model_dir, out, hooks, **overrides))
    return CacheActivationsRunner(cfg, data, model=model).run().with_format("torch")[:]


def module_outputs(model, token_ids: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Each module's output (its first element when a tuple) in one plain eval-mode pass over token_ids."""
    named, outputs = dict(model.named_modules()), {}
    handles = [
        named[h].register_forward_hook(
            lambda m, a, out, h=h: outputs.__setitem__(h, out[0] if isinstance(out, tuple) else out)
        )
        for h in hooks
    ]
    with torch.no_grad():
        model.eval()(token_ids)
    for handle in handles:
        handle.remove()
    return outputs


# -- model objects ------------------------------------------------------------------------------------------------


def hook_state(module: torch.nn.Module) -> list:
    """Every torch forward (pre-)hook and training flag of every submodule: what a run must leave as it found."""
    return [(n, list(m._forward_hooks), list(m._forward_pre_hooks), m.training) for n, m in module.named_modules()]


def model_object(kind: str, saved: dict[str, Path]):
    """(model object, its torch module, the hook to cache, where the user's own hook goes)."""
    if kind == "hooked_transformer":
        from conftest import build_model, build_tokenizer

        tl_model = build_model(build_tokenizer())
        return tl_model, tl_model, "blocks.1.hook_resid_post", "blocks.0.hook_resid_post"
    if kind == "transformer_bridge":
        bridge = TransformerBridge.boot_transformers(str(saved["gpt2"]), device="cpu")
        return bridge, bridge, "blocks.1.hook_resid_post", "blocks.0.hook_resid_post"
    if kind == "hooked_proxy_lm":
        proxy = saelens_load_model("AutoModelForCausalLM", str(saved["gpt2"]), device="cpu")
        return proxy, proxy, GPT2_RESID, "transformer.h.0"
    model = load(saved["gpt2"])
    return model, model, GPT2_RESID, "transformer.h.0"


@pytest.mark.parametrize("kind", ["pretrained_model", "hooked_proxy_lm", "transformer_bridge", "hooked_transformer"])
def test_every_kind_of_model_is_cached_in_eval_mode_and_comes_back_as_it_was(kind, saved, text, tmp_path):
    obj, module, hook, user_point = model_object(kind, saved)
    with torch.no_grad():
        obj(torch.tensor([[5, 6, 7]]))  # a model in use (a TransformerBridge adds its own hooks on its first pass)
    calls = []
    if hasattr(module, "hook_dict"):  # a TransformerLens hook, which reset_hooks would have removed
        module.hook_dict[user_point].add_hook(lambda act, hook: calls.append(1))
    else:
        dict(module.named_modules())[user_point].register_forward_hook(lambda *_: calls.append(1))
    module.train()
    list(module.modules())[-1].eval()  # mixed flags
    before, device = hook_state(module), next(module.parameters()).device

    ours = run(saved["gpt2"], tmp_path / "c", hook, text, model=obj)

    assert hook_state(module) == before and next(module.parameters()).device == device
    n_calls = len(calls)
    assert n_calls == 5  # the probe and four data passes went through the user's hook
    with torch.no_grad():
        obj(ours["token_ids"][:2].long())
    assert len(calls) == n_calls + 1  # and it is still there
    if kind == "hooked_transformer":
        _, expected = obj.eval().run_with_cache(ours["token_ids"].long(), names_filter=[hook])
        torch.testing.assert_close(ours[hook], expected[hook], rtol=1e-5, atol=1e-6)
    else:  # eval mode: the dropout of the model in train mode did not run
        expected = module_outputs(load(saved["gpt2"]), ours["token_ids"].long(), [GPT2_RESID])[GPT2_RESID]
        torch.testing.assert_close(ours[hook], expected, rtol=1e-5, atol=1e-5)


def test_a_given_tokenizer_is_used_and_a_missing_one_is_asked_for(saved, text, tmp_path):
    plain = dict(prepend_bos=False, sequence_separator_token=None)
    found = run(saved["gpt2"], tmp_path / "found", GPT2_RESID, text, model=load(saved["gpt2"]), **plain)
    assert not (found["token_ids"] == 0).any()  # the saved GPT-2 tokenizer adds no BOS
    cfg = CacheActivationsRunnerConfig(**cache_options(saved["gpt2"], tmp_path / "given", GPT2_RESID, **plain))
    given = CacheActivationsRunner(cfg, text, model=load(saved["gpt2"]), tokenizer=build_tokenizer(bos_first=True))
    assert (given.run().with_format("torch")[:]["token_ids"] == 0).any()  # this one puts BOS before every text

    unnamed = load(saved["gpt2"])
    unnamed.name_or_path = ""
    cfg = CacheActivationsRunnerConfig(**cache_options(saved["gpt2"], tmp_path / "none", GPT2_RESID))
    with pytest.raises(ValueError, match=r"pass CacheActivationsRunner\(cfg, model=..., tokenizer=...\)"):
        CacheActivationsRunner(cfg, text, model=unnamed).run()


# -- the hooks verb -----------------------------------------------------------------------------------------------


def test_the_hooks_verb_lists_names_and_widths_for_both_kinds(saved, capsys):
    assert cli.main(["hooks", str(saved["llama"]), "--device", "cpu"]) == 0  # a directory: AutoModelForCausalLM
    out = capsys.readouterr().out
    for name, width in [("model.layers.1", 32), ("model.layers.0.self_attn", 32), ("model.layers.1.mlp.up_proj", 64)]:
        assert re.search(rf"^  {re.escape(name)} +{width}$", out, re.M), name
    assert not re.search(r"^  model\.layers ", out, re.M) and "--all lists them" in out

    assert cli.main(["hooks", str(saved["llama"]), "--all", "--model_class_name", "AutoModelForCausalLM"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  model\.layers +- +did not run", out, re.M)
    assert re.search(r"^  model\.rotary_emb +- +gives activations of shape \(1, 5, 8\)", out, re.M)

    assert cli.main(["hooks", "sae-cache/demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  blocks\.0\.hook_resid_post +256$", out, re.M)
    assert re.search(r"^  blocks\.0\.attn\.hook_z +256$", out, re.M) and "hook_pattern" not in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "the following arguments are required: model_name"),
        (["x", "--model_class_name", "HookedMamba"], "invalid choice: 'HookedMamba'"),
        (["/no/such/model", "--model_class_name", "AutoModelForCausalLM"], "/no/such/model"),
    ],
)
def test_the_hooks_verb_exits_2_with_one_line(args, fragment, capsys):
    assert cli.main(["hooks", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


# -- SAELens trains from the cache --------------------------------------------------------------------------------


def spy_on(serve, served: list):
    """`serve`, keeping what it returns in `served`."""

    def spy(*args, **kwargs):
        served.append(serve(*args, **kwargs))
        return served[-1]

    return spy


def test_saelens_trains_from_a_cli_cache_with_auto_model_for_causal_lm(saved, text, tmp_path, monkeypatch, capsys):
    data_dir, out = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    text.to_parquet(str(data_dir / "train.parquet"))
    hooks = [HOOKS["llama"]["attn"], HOOKS["llama"]["resid"]]
    flags = {**cache_options(saved["llama"], out, ",".join(hooks), shuffle=True), "dataset_path": str(data_dir)}
    assert cli.main([arg for k, v in flags.items() for arg in (f"--{k}", str(v))]) == 0
    printed = capsys.readouterr().out  # the SAELens script the run prints names the transformers path
    for line in ["model_class_name='AutoModelForCausalLM',", f"hook_name={hooks[0]!r},", f"context_size={CONTEXT},"]:
        assert line in printed
    assert f"d_in={D_MODEL}," in printed
    cache = datasets.load_from_disk(str(out)).with_format("torch")[:]
    monkeypatch.chdir(tmp_path)

    for hook in hooks:
        cfg = LanguageModelSAERunnerConfig(
            sae=StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=64, l1_coefficient=1.0),
            model_name=str(saved["llama"]),
            model_class_name="AutoModelForCausalLM",
            hook_name=hook,
            dataset_path=str(data_dir),
            is_dataset_tokenized=False,
            streaming=False,
            context_size=CONTEXT,
            use_cached_activations=True,
            cached_activations_path=str(out),
            training_tokens=CONTEXT * 12,
            train_batch_size_tokens=32,
            store_batch_size_prompts=4,
            n_batches_in_buffer=2,
            device="cpu",
            logger=LoggingConfig(log_to_wandb=False),
            n_checkpoints=0,
            checkpoint_path=str(tmp_path / "checkpoints"),
            output_path=str(tmp_path / f"sae_{hook}"),
            verbose=False,
        )
        runner = LanguageModelSAETrainingRunner(cfg)
        runner.model.model.register_forward_pre_hook(lambda *_: pytest.fail("SAELens ran the model"))
        served: list = []
        spy = spy_on(runner.activations_store.get_raw_llm_batch, served)
        monkeypatch.setattr(runner.activations_store, "get_raw_llm_batch", spy)
        initial = runner.sae.W_dec.detach().clone()
        sae = runner.run()
        rows = torch.cat([acts for acts, _ in served]).reshape(-1, CONTEXT, D_MODEL)
        assert torch.equal(rows, cache[hook][: len(rows)])  # our column, in our order
        assert torch.isfinite(sae.W_dec).all() and not torch.equal(initial, sae.W_dec.detach())


# -- targeted caching, shuffle, resume, ranks ---------------------------------------------------------------------


def test_targeted_prompts_padded_and_masked_equal_unbatched_passes(saved, tmp_path):
    words = texts(40, seed=9)
    prompts = [" ".join(t.split()[: 3 + i % 11]) for i, t in enumerate(words)]
    data = datasets.Dataset.from_dict({"prompt": prompts, "target": [p.split()[-1] for p in prompts]})
    hooks = [HOOKS["llama"]["attn"], HOOKS["llama"]["resid"]]
    cfg = TargetedCacheConfig(output_path=str(tmp_path / "t"), hook_names=hooks, n_positions=2, batch_size=8)
    model = load(saved["llama"])
    out = cache_targeted(cfg, data, model).with_format("torch")
    assert len(out) == len(prompts) and len({len(t) for t in out["token_ids"]}) > 5  # really padded
    for row in out:
        alone = module_outputs(model, row["token_ids"][None].long(), hooks)
        for hook in hooks:
            expected = torch.stack([alone[hook][0, p] if p >= 0 else torch.zeros(D_MODEL) for p in row["positions"]])
            torch.testing.assert_close(row[hook], expected, rtol=1e-5, atol=1e-5)


def row_keys(cache: dict, hook: str) -> list[bytes]:
    return sorted(a.numpy().tobytes() + t.numpy().tobytes() for a, t in zip(cache[hook], cache["token_ids"]))


def test_the_shuffles_permute_the_unshuffled_cache(saved, text, tmp_path):
    hook = HOOKS["llama"]["resid"]
    plain = run(saved["llama"], tmp_path / "plain", hook, text)
    rows = run(saved["llama"], tmp_path / "rows", hook, text, shuffle=True, seed=3)
    assert not torch.equal(rows["token_ids"], plain["token_ids"])
    assert row_keys(rows, hook) == row_keys(plain, hook)

    mixed = run(saved["llama"], tmp_path / "mixed", hook, text, shuffle=True, shuffle_across_sequences=True)
    flat = {k: v.reshape(-1, 1, *v.shape[2:]) for k, v in mixed.items()}
    flat_plain = {k: v.reshape(-1, 1, *v.shape[2:]) for k, v in plain.items()}
    assert row_keys(flat, hook) == row_keys(flat_plain, hook)


def test_forward_threads_give_the_cache_of_one_thread(saved, text, tmp_path):
    hooks = [HOOKS["gpt2"]["attn"], GPT2_RESID]
    one = run(saved["gpt2"], tmp_path / "one", hooks, text, forward_threads=1)
    three = run(saved["gpt2"], tmp_path / "three", hooks, text, forward_threads=3)
    assert all(torch.equal(one[c], three[c]) for c in [*hooks, "token_ids"])


def test_an_interrupted_run_resumes_to_the_same_bytes(saved, text, tmp_path):
    hook = [HOOKS["gpt2"]["attn"], GPT2_RESID]
    run(saved["gpt2"], tmp_path / "ref", hook, text, shuffle=True)
    model, passes = load(saved["gpt2"]), []

    def fail_third_data_pass(module, args, kwargs):
        if tuple(kwargs["input_ids"].shape) != PROBE_SHAPE:
            passes.append(1)
            if len(passes) == 3:
                raise RuntimeError("interrupted")

    handle = model.register_forward_pre_hook(fail_third_data_pass, with_kwargs=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(saved["gpt2"], tmp_path / "out", hook, text, model=model, shuffle=True)
    handle.remove()
    work = Path(f"{tmp_path / 'out'}.sae_cache-tmp")
    assert not (tmp_path / "out").exists() and list(work.rglob("shard_00000.json"))  # a complete shard was kept

    run(saved["gpt2"], tmp_path / "out", hook, text, model=model, shuffle=True, resume=True)
    names = sorted(p.name for p in (tmp_path / "ref").glob("*.arrow"))
    assert names and all((tmp_path / "out" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes() for n in names)


WORKER = r"""
import json, sys
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from datasets import Dataset
from hf_fixtures import texts
from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig

torch.set_num_threads(1)
rank, world, init, options = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
ds = CacheActivationsRunner(CacheActivationsRunnerConfig(**options), Dataset.from_dict({{"text": texts(400)}})).run()
print(json.dumps({{"rank": rank, "rows": len(ds)}}))
dist.destroy_process_group()
"""


def test_ranks_load_the_model_by_path_and_cache_the_rows_of_one_process(saved, text, tmp_path):
    hook = HOOKS["llama"]["mlp"]
    single = run(saved["llama"], tmp_path / "single", hook, text)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    init, opts = (
        f"file://{tmp_path}/init-{os.urandom(4).hex()}",
        cache_options(saved["llama"], tmp_path / "multi", hook),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, json.dumps(opts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["rows"] == ROWS
    multi = datasets.load_from_disk(str(tmp_path / "multi")).with_format("torch")[:]
    assert row_keys(multi, hook) == row_keys(single, hook)
