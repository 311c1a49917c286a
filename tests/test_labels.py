"""Label columns ride along with rows that map to one input row, through the on-disk shuffle too."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def labeled_text():
    from conftest import make_texts

    texts = make_texts(200, seed=3)
    return Dataset.from_dict(
        {
            "text": texts,
            "label": list(range(200)),
            "score": [i / 7 for i in range(200)],
            "flag": [i % 3 == 0 for i in range(200)],
        }
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_no_concat_rows_keep_their_input_labels(model, labeled_text, make_cfg, shuffle):
    cfg = make_cfg(
        disable_concat_sequences=True,
        label_columns=["label", "score", "flag"],
        shuffle=shuffle,
        training_tokens=16 * 30,
    )
    ds = CacheActivationsRunner(cfg, override_dataset=labeled_text, model=model).run()
    assert (
        ds.features["label"].dtype == "int64"
        and ds.features["score"].dtype == "float64"
        and ds.features["flag"].dtype == "bool"
    )
    rows = ds.with_format("torch")[:]
    for tokens, label, score, flag, acts in zip(
        rows["token_ids"], rows["label"], rows["score"], rows["flag"], rows[HOOK]
    ):
        source = labeled_text[int(label)]
        expected = model.to_tokens(source["text"], prepend_bos=True, truncate=False)[0, :16]
        assert torch.equal(tokens.long(), expected)
        assert score.item() == pytest.approx(source["score"]) and bool(flag) == source["flag"]
        _, cache = model.run_with_cache(expected[None])
        torch.testing.assert_close(acts, cache[HOOK][0], atol=1e-5, rtol=1e-5)
    if shuffle:
        assert rows["label"].tolist() != sorted(rows["label"].tolist())


def test_pretokenized_rows_keep_labels(model, token_dataset, make_cfg):
    data = token_dataset.add_column("label", list(range(len(token_dataset))))
    ds = CacheActivationsRunner(
        make_cfg(context_size=-1, training_tokens=24 * 12, label_columns="label"), override_dataset=data, model=model
    ).run()
    assert ds["label"] == list(range(12))


def test_label_errors_before_any_work(model, labeled_text, make_cfg):
    with pytest.raises(ValueError, match="disable_concat_sequences=True"):
        CacheActivationsRunner(make_cfg(label_columns=["label"]), override_dataset=labeled_text, model=model).run()
    with pytest.raises(ValueError, match="not columns of the dataset"):
        CacheActivationsRunner(
            make_cfg(disable_concat_sequences=True, label_columns=["nope"]), override_dataset=labeled_text, model=model
        ).run()
    with pytest.raises(ValueError, match="only numeric scalars"):
        CacheActivationsRunner(
            make_cfg(disable_concat_sequences=True, label_columns=["text"]), override_dataset=labeled_text, model=model
        ).run()
    with pytest.raises(ValueError, match="shuffle_across_sequences"):
        CacheActivationsRunnerConfig(label_columns=["label"], shuffle_across_sequences=True)
