"""Train the embedded demo tokenizer and model on CPU from the bundled text, and write the assets.

Reproducible: fixed seeds, a fixed thread count and a seeded data order, so a rerun on the same
torch build writes the same weights. Run from the repository root:

    .venv/bin/python scripts/train_demo_model.py

It reads ``sae_cache/demo/assets/austen.txt.gz`` and writes ``tokenizer.json``, ``config.json``,
``model.safetensors`` and ``training.json`` beside it. ``--rebuild-text RDB`` first rewrites the text
from the ``Rdata.rdb`` of Debian's ``r-cran-janeaustenr`` package (see docs/demo.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import struct
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_cache.demo import (
    ASSETS_DIR,
    CONFIG_FILE,
    DEMO_MODEL_NAME,
    TEXT_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    load_demo_dataset,
    load_demo_model,
)
from sae_cache.demo.tokenizer import train_bpe_tokenizer

BOS_ID = 0
VALIDATION_EVERY = 20  # paragraph i is held out for validation when i % 20 == 19

MODEL_CONFIG = dict(
    model_name=DEMO_MODEL_NAME,
    n_layers=4,
    d_model=256,
    n_heads=4,
    d_head=64,
    d_mlp=1024,
    n_ctx=256,
    act_fn="gelu",
    normalization_type="LN",
    positional_embedding_type="standard",
    default_prepend_bos=True,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild-text", type=Path, help="rewrite the bundled text from janeaustenr's Rdata.rdb")
    parser.add_argument("--text-only", action="store_true", help="stop after --rebuild-text")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="where the model assets are written")
    return parser.parse_args()


# --- the text ---------------------------------------------------------------------------------------


def _read_r_character_vectors(rdb_path: Path) -> list[list[str]]:
    """Decode the character vectors of an R lazy-load database (each entry: length + zlib + XDR)."""
    blob = rdb_path.read_bytes()
    vectors, pos = [], 0
    while pos < len(blob):
        inflater = zlib.decompressobj()
        raw = inflater.decompress(blob[pos + 4 :])
        pos = len(blob) - len(inflater.unused_data)
        vectors.append(_decode_xdr_character_vector(raw))
    return vectors


def _decode_xdr_character_vector(raw: bytes) -> list[str]:
    if raw[:2] != b"X\n":
        raise ValueError("not an XDR-serialized R object")
    pos = 2

    def take_int() -> int:
        nonlocal pos
        (value,) = struct.unpack(">i", raw[pos : pos + 4])
        pos += 4
        return value

    version = take_int()
    take_int(), take_int()  # R version that wrote it, minimal R version to read it
    if version == 3:
        encoding_length = take_int()  # then the native encoding name, skipped
        pos += encoding_length
    if take_int() & 0xFF != 16:
        raise ValueError("expected a character vector (STRSXP)")
    strings = []
    for _ in range(take_int()):
        take_int()  # CHARSXP flags
        length = take_int()
        strings.append("" if length == -1 else raw[pos : pos + length].decode("utf-8"))
        pos += max(length, 0)
    return strings


def _unwrap_paragraphs(lines: list[str]) -> list[str]:
    """Join the hard-wrapped lines of a Project Gutenberg text into one line per paragraph."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def rebuild_text(rdb_path: Path, out_path: Path) -> None:
    books = _read_r_character_vectors(rdb_path)
    paragraphs = [p for lines in books for p in _unwrap_paragraphs(lines)]
    with gzip.GzipFile(out_path, "wb", mtime=0) as f:  # mtime=0: byte-identical reruns
        f.write("\n\n".join(paragraphs).encode("utf-8") + b"\n")
    print(f"wrote {out_path}: {len(books)} books, {len(paragraphs)} paragraphs")


# --- data -------------------------------------------------------------------------------------------


def split_paragraphs(paragraphs: list[str]) -> tuple[list[str], list[str]]:
    train = [p for i, p in enumerate(paragraphs) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    val = [p for i, p in enumerate(paragraphs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    return train, val


def pack_rows(tokenizer, paragraphs: list[str], context_size: int) -> torch.Tensor:
    """Rows of ``context_size`` tokens, BOS first, paragraphs concatenated with BOS between them.

    This is the layout sae_cache's default (concat mode, ``prepend_bos``, separator ``bos``) caches.
    """
    stream = []
    for encoding in tokenizer.encode_batch(paragraphs):
        stream.append(BOS_ID)
        stream.extend(encoding.ids)
    body = context_size - 1
    n_rows = len(stream) // body
    tokens_RB = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    return torch.cat([torch.full((n_rows, 1), BOS_ID), tokens_RB], dim=1)


# --- training ---------------------------------------------------------------------------------------


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: HookedTransformer, rows_RL: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    losses = [model(rows_RL[i : i + batch_size], return_type="loss").item() for i in range(0, len(rows_RL), batch_size)]
    model.train()
    return sum(losses) / len(losses)


def train(model: HookedTransformer, train_RL: torch.Tensor, val_RL: torch.Tensor, args) -> dict:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_RL), generator=generator)
    cursor, epoch, recent, train_loss = 0, 0, [], float("nan")
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order, cursor, epoch = torch.randperm(len(train_RL), generator=generator), 0, epoch + 1
        batch_BL = train_RL[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(batch_BL, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % 50 == 0:
            print(
                f"step {step + 1:5d}  epoch {epoch}  train loss {sum(recent) / len(recent):.3f}  "
                f"lr {learning_rate(step, args):.2e}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
            train_loss, recent = sum(recent) / len(recent), []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}  val loss {evaluate(model, val_RL):.3f}", flush=True)
    return {
        "train_loss_last_50_steps": round(train_loss, 4),
        "epochs": round(args.steps * args.batch_size / len(train_RL), 2),
    }


def write_assets(model: HookedTransformer, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / TOKENIZER_FILE))
    config = {**MODEL_CONFIG, "d_vocab": model.cfg.d_vocab}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = {name: p.detach().to(torch.float16).contiguous() for name, p in model.named_parameters()}
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model_name": DEMO_MODEL_NAME})


def main() -> None:
    args = parse_args()
    if args.rebuild_text:
        rebuild_text(args.rebuild_text, ASSETS_DIR / TEXT_FILE)
        if args.text_only:
            return
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    train_text, val_text = split_paragraphs(list(load_demo_dataset()["text"]))
    tokenizer = train_bpe_tokenizer(train_text, vocab_size=args.vocab_size)
    train_RL = pack_rows(tokenizer, train_text, args.context_size)
    val_RL = pack_rows(tokenizer, val_text, args.context_size)
    vocab_size = tokenizer.get_vocab_size()
    print(
        f"tokenizer: {vocab_size} tokens ({time.perf_counter() - started:.0f}s); "
        f"train {train_RL.numel():,} tokens in {len(train_RL)} rows, val {val_RL.numel():,} tokens; "
        f"ln(vocab) = {math.log(vocab_size):.3f}",
        flush=True,
    )

    model = HookedTransformer(HookedTransformerConfig(**MODEL_CONFIG, d_vocab=vocab_size, seed=args.seed))
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    metrics = train(model, train_RL, val_RL, args)
    write_assets(model, tokenizer, args.out)

    if args.out.resolve() == ASSETS_DIR:  # check what ships: the float16 weights, loaded the way users load them
        metrics["val_loss"] = round(evaluate(load_demo_model(), val_RL), 4)
    else:
        metrics["val_loss"] = round(evaluate(model, val_RL), 4)
    metrics.update(
        ln_vocab=round(math.log(vocab_size), 4),
        train_tokens=train_RL.numel(),
        val_tokens=val_RL.numel(),
        run_time_s=round(time.perf_counter() - started),
        cpu_time_s=round(time.process_time()),  # all threads: about 2x the wall time on an idle 2-core machine
        torch=torch.__version__,
        args={k: v for k, v in vars(args).items() if k not in ("out", "rebuild_text", "text_only")},
    )
    (args.out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
