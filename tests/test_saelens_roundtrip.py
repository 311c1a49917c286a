"""Round trip through SAELens itself: what sae_cache writes, SAELens 6.x reads and trains from unchanged.

- SAELens's `ActivationsStore`, pointed at our cache with `cached_activations_path`, returns exactly the
  activations and token ids we stored, row for row (compared with `datasets.load_from_disk`, with our
  Arrow files read by pyarrow, and with `model.run_with_cache` on the stored token ids), for unshuffled,
  shuffled, sliced float16, across-sequence shuffled and two-hook caches.
- SAELens's training-time `exclude_special_tokens` works on our `token_ids` column.
- `LanguageModelSAETrainingRunner` with `use_cached_activations=True` trains a few steps from each hook
  column of a two-hook cache, reading our rows in order, never running the model, never touching the
  network, writing only under tmp_path; and from a config alone (a local raw-text `dataset_path`).
- For the same config, model and text, our cache equals SAELens's own `CacheActivationsRunner` output
  (features, token ids, activations), also for a hook with a head dimension (`hook_z`).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

pytest.importorskip("sae_lens")

from sae_lens import SAE, LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig  # noqa: E402
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore  # noqa: E402
from sae_lens.util import get_special_token_ids  # noqa: E402

from sae_cache import CacheActivationsRunner  # noqa: E402

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
D_IN = 32


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Fail the test if anything opens a network connection; keep wandb and the Hub off."""
    attempts: list = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family == getattr(socket, "AF_UNIX", None):
            return real_connect(sock, address)
        attempts.append(address)
        raise OSError(f"network access attempted in an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    yield
    assert not attempts, f"something tried the network: {attempts}"


def make_cache(make_cfg, dataset, model, name: str, **overrides) -> tuple[Path, datasets.Dataset]:
    cfg = make_cfg(
        new_cached_activations_path=str(Path(make_cfg().new_cached_activations_path).parent / name), **overrides
    )
    returned = CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()
    return Path(cfg.new_cached_activations_path), returned


def saelens_store(cache: Path, hook: str, context_size: int, *, batch_prompts: int = 1) -> ActivationsStore:
    """SAELens's store reading a cache only: no dataset, no model needed (the minimal faithful construction)."""
    return ActivationsStore(
        model=None,  # type: ignore[arg-type]  # never used when reading cached activations
        dataset=None,
        streaming=False,
        hook_name=hook,
        hook_head_index=None,
        context_size=context_size,
        d_in=D_IN,
        n_batches_in_buffer=2,
        total_training_tokens=10_000,
        store_batch_size_prompts=batch_prompts,
        train_batch_size_tokens=64,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        cached_activations_path=str(cache),
    )


def read_all_rows(store: ActivationsStore, context_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row SAELens serves in one epoch, as (rows, context, d_in) activations and (rows, context) ids."""
    acts, ids = [], []
    while True:
        try:
            a, t = store.get_raw_llm_batch(raise_on_epoch_end=True)
        except StopIteration:
            break
        assert t is not None, "SAELens did not pick up the token_ids column"
        acts.append(a.reshape(-1, context_size, D_IN))
        ids.append(t.reshape(-1, context_size))
    return torch.cat(acts), torch.cat(ids)


def arrow_files_rows(cache: Path, hook: str) -> tuple[np.ndarray, np.ndarray]:
    """The cache's rows read straight from its Arrow files with pyarrow, in state.json's order."""
    state = json.loads((cache / "state.json").read_text())
    acts, ids = [], []
    for entry in state["_data_files"]:
        with pa.memory_map(str(cache / entry["filename"]), "r") as source:
            table = pa.ipc.open_stream(source).read_all()
        column = table.column(hook).combine_chunks()
        storage = column.storage if isinstance(column, pa.ExtensionArray) else column
        length = table.column("token_ids").type.list_size
        acts.append(storage.flatten().flatten().to_numpy().reshape(len(table), length, -1))
        ids.append(table.column("token_ids").combine_chunks().flatten().to_numpy().reshape(len(table), length))
    return np.concatenate(acts), np.concatenate(ids)


def columns(cache: Path) -> dict[str, torch.Tensor]:
    """Every column of the cache as loaded by `datasets.load_from_disk`, as torch tensors."""
    return datasets.load_from_disk(str(cache)).with_format("torch")[:]


def model_activations(model, token_ids: torch.Tensor, hook: str) -> torch.Tensor:
    _, cache = model.run_with_cache(token_ids.long(), names_filter=[hook], prepend_bos=False)
    return cache[hook]


CASES = {
    "unshuffled": dict(shuffle=False),
    "shuffled": dict(shuffle=True, seed=7),
    "sliced_float16": dict(shuffle=True, seqpos_slice=(1, None), dtype="float16"),
    "across_sequences": dict(shuffle=True, shuffle_across_sequences=True, exclude_special_tokens=True),
}


@pytest.mark.parametrize("case", CASES)
def test_saelens_activations_store_reads_exactly_what_we_stored(case, make_cfg, text_dataset, model):
    overrides = CASES[case]
    cache, returned = make_cache(make_cfg, text_dataset, model, case, **overrides)
    hook = make_cfg().hook_name
    length = 15 if "seqpos_slice" in overrides else 16
    on_disk = columns(cache)
    n_rows = 16 * 40 // length
    assert len(on_disk["token_ids"]) == n_rows

    store = saelens_store(cache, hook, context_size=length)
    acts, ids = read_all_rows(store, length)

    # Row for row: SAELens == load_from_disk == our Arrow files == the dataset run() returned.
    expected_acts = on_disk[hook].to(torch.float32)
    expected_ids = on_disk["token_ids"]
    assert acts.shape == (n_rows, length, D_IN)
    assert torch.equal(acts, expected_acts)
    assert torch.equal(ids.long(), expected_ids.long())
    file_acts, file_ids = arrow_files_rows(cache, hook)
    assert torch.equal(acts, torch.from_numpy(file_acts.astype(np.float32)))
    assert torch.equal(ids.long(), torch.from_numpy(file_ids).long())
    assert torch.equal(returned.with_format("torch")[:]["token_ids"].long(), ids.long())
    assert torch.isfinite(acts).all() and acts.abs().sum() > 0

    if "seqpos_slice" in overrides:
        # context_size is the SLICED length: the unsliced length is refused by SAELens.
        with pytest.raises(ValueError, match="does not match context_size"):
            saelens_store(cache, hook, context_size=16)
        # Position 0 of every prepend_bos row is BOS: put it back, run the model, drop it again.
        bos = torch.full((len(ids), 1), model.tokenizer.bos_token_id)
        full = model_activations(model, torch.cat([bos, ids.long()], dim=1), hook)[:, 1:]
        torch.testing.assert_close(acts, full.half().float(), rtol=2e-3, atol=2e-3)
    elif case == "across_sequences":
        # Rows mix positions of many sequences (not model inputs); the special tokens were dropped.
        assert not torch.isin(ids.long(), torch.tensor(get_special_token_ids(model.tokenizer))).any()
    else:
        # Each stored row is a whole model input: the model on its token ids gives its activations.
        torch.testing.assert_close(acts, model_activations(model, ids, hook), rtol=1e-5, atol=1e-5)

    if case == "shuffled":
        unshuffled_cache, _ = make_cache(make_cfg, text_dataset, model, "reference", shuffle=False)
        reference = columns(unshuffled_cache)["token_ids"].long()
        assert not torch.equal(reference, ids.long()), "shuffle=True served the rows in the unshuffled order"
        assert sorted(map(tuple, reference.tolist())) == sorted(map(tuple, ids.long().tolist()))


def test_saelens_reads_each_column_of_a_multi_hook_cache(make_cfg, text_dataset, model):
    cache, _ = make_cache(make_cfg, text_dataset, model, "two_hooks", hook_name=HOOKS, shuffle=True)
    assert datasets.load_from_disk(str(cache)).column_names == [*HOOKS, "token_ids"]
    on_disk = columns(cache)

    served = {}
    for hook in HOOKS:
        store = saelens_store(cache, hook, context_size=16, batch_prompts=4)
        acts, ids = read_all_rows(store, 16)
        assert torch.equal(acts, on_disk[hook])
        assert torch.equal(ids.long(), on_disk["token_ids"].long())
        torch.testing.assert_close(acts, model_activations(model, ids, hook), rtol=1e-5, atol=1e-5)
        served[hook] = acts
    assert not torch.allclose(served[HOOKS[0]], served[HOOKS[1]]), "both hooks served the same column"

    with pytest.raises(ValueError, match=r"blocks\.2\.hook_resid_post"):  # a hook the cache lacks
        saelens_store(cache, "blocks.2.hook_resid_post", context_size=16)


def training_config(cache: Path, hook: str, tmp_path: Path, **overrides) -> LanguageModelSAERunnerConfig:
    """The SAELens 6.x config that trains from a sae_cache cache (docs/saelens.md shows it for gpt2)."""
    fields = dict(
        sae=StandardTrainingSAEConfig(d_in=D_IN, d_sae=64, l1_coefficient=1.0),
        model_name="tiny",
        hook_name=hook,  # one column of the cache
        dataset_path="unused-override-dataset-given",  # only peeked at; never iterated from cached activations
        is_dataset_tokenized=False,
        streaming=False,
        context_size=16,  # the cache's (sliced) row length
        use_cached_activations=True,
        cached_activations_path=str(cache),
        training_tokens=320,
        train_batch_size_tokens=32,
        store_batch_size_prompts=4,
        n_batches_in_buffer=2,
        lr=1e-3,
        device="cpu",
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(tmp_path / "checkpoints"),
        n_checkpoints=0,
        output_path=str(tmp_path / f"sae_{hook}"),
        verbose=False,
    )
    fields.update(overrides)
    return LanguageModelSAERunnerConfig(**fields)


def test_saelens_exclude_special_tokens_filters_through_cached_token_ids(make_cfg, text_dataset, model, tmp_path):
    cache, _ = make_cache(make_cfg, text_dataset, model, "specials", shuffle=False)
    hook = make_cfg().hook_name
    cfg = training_config(cache, hook, tmp_path, exclude_special_tokens=True, store_batch_size_prompts=40)
    # The constructor SAELens's training runner uses.
    store = ActivationsStore.from_config(model, cfg, override_dataset=text_dataset)
    assert store.cached_activation_dataset is not None

    kept = store.get_filtered_llm_batch()
    on_disk = columns(cache)
    acts = on_disk[hook].reshape(-1, D_IN)
    ids = on_disk["token_ids"].reshape(-1).long()
    special = torch.isin(ids, torch.tensor(get_special_token_ids(model.tokenizer)))
    assert special[::16].all(), "every row of a prepend_bos cache starts with BOS"
    assert 0 < special.sum() < len(ids)
    assert torch.equal(kept, acts[~special])


def test_saelens_trains_from_each_hook_of_a_multi_hook_cache(make_cfg, text_dataset, model, tmp_path, monkeypatch):
    cache, _ = make_cache(make_cfg, text_dataset, model, "train", hook_name=HOOKS, shuffle=True)
    on_disk = columns(cache)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # SAELens's default paths are relative: prove nothing lands there

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("SAELens ran the model although it was told to use cached activations")

    monkeypatch.setattr(model, "run_with_cache", no_forward_pass)

    for hook in HOOKS:
        cfg = training_config(cache, hook, tmp_path)
        runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=text_dataset)
        served: list[torch.Tensor] = []
        serve = runner.activations_store.get_raw_llm_batch

        def spy(*args, serve=serve, served=served, **kwargs):
            acts, ids = serve(*args, **kwargs)
            served.append(acts.clone())
            return acts, ids

        monkeypatch.setattr(runner.activations_store, "get_raw_llm_batch", spy)
        initial = {name: p.detach().clone() for name, p in runner.sae.named_parameters()}

        sae = runner.run()

        # It trained on our column, in our order: each batch is the next rows of the cache.
        assert served, "SAELens never read the cache"
        rows = torch.cat(served).reshape(-1, 16, D_IN)
        assert rows.shape[0] * 16 >= cfg.training_tokens
        assert torch.equal(rows, on_disk[hook][: len(rows)])
        # A few steps happened and moved the weights; they are finite.
        params = dict(sae.named_parameters())
        assert all(torch.isfinite(p).all() for p in params.values())
        assert any(not torch.equal(initial[name], p.detach()) for name, p in params.items())
        assert sae.cfg.d_in == D_IN and sae.cfg.metadata.hook_name == hook
        # The trained SAE was saved under tmp_path and loads back.
        loaded = SAE.load_from_disk(cfg.output_path, device="cpu")
        assert torch.equal(loaded.W_dec.detach(), sae.W_dec.detach())
        assert loaded.cfg.metadata.hook_name == hook

    assert list(cwd.iterdir()) == []


def test_saelens_trains_from_config_alone_with_a_local_text_dataset(make_cfg, text_dataset, model, tmp_path):
    """No override_dataset: dataset_path must name a dataset SAELens can open (never the cache itself)."""
    cache, _ = make_cache(make_cfg, text_dataset, model, "config_only", shuffle=True)
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    text_dataset.to_parquet(str(text_dir / "train.parquet"))
    hook = make_cfg().hook_name
    cfg = training_config(cache, hook, tmp_path, dataset_path=str(text_dir), streaming=True, training_tokens=128)

    sae = LanguageModelSAETrainingRunner(cfg, override_model=model).run()

    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert (Path(cfg.output_path) / "sae_weights.safetensors").exists()


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"])
def test_cache_equals_saelens_own_cache_activations_runner(hook, make_cfg, text_dataset, model, tmp_path, monkeypatch):
    """Same config, same model, same text: our cache holds SAELens's cache's features, rows and values.

    hook_z has a head dimension: SAELens flattens (n_heads, d_head) into d_in = n_heads * d_head.
    """
    import sae_lens.cache_activations_runner as saelens_runner
    from sae_lens import CacheActivationsRunnerConfig as SaeLensCacheConfig

    cfg = make_cfg(shuffle=False, hook_name=hook)
    ours = datasets.load_from_disk(
        str(make_cache(make_cfg, text_dataset, model, "ours", shuffle=False, hook_name=hook)[0])
    )
    monkeypatch.setattr(saelens_runner, "load_model", lambda **kwargs: model)  # SAELens cannot take a model object
    theirs_cfg = SaeLensCacheConfig(
        dataset_path=cfg.dataset_path,
        model_name=cfg.model_name,
        model_batch_size=cfg.model_batch_size,
        hook_name=cfg.hook_name,
        d_in=cfg.d_in,
        training_tokens=cfg.training_tokens,
        context_size=cfg.context_size,
        new_cached_activations_path=str(tmp_path / "theirs"),
        shuffle=False,
        device="cpu",
        buffer_size_gb=cfg.buffer_size_gb,
    )
    theirs = saelens_runner.CacheActivationsRunner(theirs_cfg, override_dataset=text_dataset).run()

    assert ours.features == theirs.features
    n = len(ours)
    assert n == cfg.training_tokens // cfg.context_size and len(theirs) >= n
    ours_t, theirs_t = ours.with_format("torch")[:], theirs.with_format("torch")[:n]
    assert torch.equal(ours_t["token_ids"], theirs_t["token_ids"])
    torch.testing.assert_close(ours_t[cfg.hook_name], theirs_t[cfg.hook_name], rtol=1e-5, atol=1e-5)


def test_saelens_default_cached_activations_path_finds_our_default_output(
    make_cfg, text_dataset, model, tmp_path, monkeypatch
):
    """Single hook, no path given on either side: SAELens looks exactly where we wrote."""
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(new_cached_activations_path=None, dataset_path="org/some-text", shuffle=True)
    CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model).run()
    train_cfg = training_config(
        Path("unused"), cfg.hook_name, tmp_path, dataset_path="org/some-text", cached_activations_path=None
    )
    assert train_cfg.cached_activations_path == cfg.new_cached_activations_path

    store = ActivationsStore.from_config(model, train_cfg, override_dataset=text_dataset)

    acts, _ = store.get_raw_llm_batch()
    assert torch.equal(
        acts.reshape(-1, 16, D_IN), columns(tmp_path / cfg.new_cached_activations_path)[cfg.hook_name][:4]
    )
