"""Train dymoe's shipped demo model: a small Qwen3-MoE language model on text that ships with Python.

    nice -n 10 python scripts/train_demo_model.py --out models/demo

Recipe (every default below is the shipped one; the model card in ``--out`` records what ran):

* Data: ``pydoc_data.topics`` (the help texts behind ``help("TOPIC")``) plus the docstrings of the
  standard library (modules, public classes, methods and functions defined in each module), gathered
  in a child interpreter started with ``-I -S`` so only the standard library is importable.
  Documents are sorted by name; exact duplicate docstrings are dropped.
* Split: documents sorted by sha256 of their name; the first ones, up to ``--heldout-frac`` of all
  characters, are held out (never trained on, not even by the tokenizer) and written to
  ``heldout.txt`` with ``<|endoftext|>`` after each document.
* Tokenizer: byte-level BPE (``tokenizers``), ``--vocab`` entries, ``<|endoftext|>`` = id 0 = eos.
* Model: ``transformers.Qwen3MoeForCausalLM``; every layer MoE, tied embeddings.
* Loss: next-token cross-entropy computed here from the logits, plus router losses computed *per
  layer* and averaged over layers: a Switch-style balancing loss (E * sum_i f_i P_i) whose weight
  is strong early (the routers collapse within a few dozen steps otherwise) and then ramps down (to
  zero by default, so each layer can settle into its own skew), a floor loss that pushes up only
  the experts used less than ``--floor-share`` (so none dies), and a small z-loss. transformers' own
  auxiliary loss (which balances the layers' concatenation, so a single layer can still collapse)
  is switched off (``router_aux_loss_coef=0``; no labels are passed).
* Optimiser: AdamW, linear warm-up then cosine decay, gradient clipping; fully seeded and run with
  ``torch.use_deterministic_algorithms(True)`` on a fixed number of threads.
* Output: weights rounded to bf16 and to fp16, the one whose held-out loss stays closer to fp32 is
  saved (``model.safetensors``, one tensor per expert matrix), with config, tokenizer, held-out text,
  prompts, ``training_report.json`` and the model card ``README.md``.

The script is also its own data collector: ``--collect-corpus FILE`` (used internally, in the
child interpreter) writes the documents as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

EOS = "<|endoftext|>"
# a plain question/answer layout for `dymoe serve`'s chat endpoint (the model is not chat-tuned)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Answer: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('the demo model knows the roles system, user and assistant') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)

# --------------------------------------------------------------------------------------------
# Corpus (runs in a child ``python -I -S``: standard library only, no site-packages)
# --------------------------------------------------------------------------------------------

# importing these has side effects (a web browser, printing) or they are tests / tools, not API docs
SKIP_TOP = {"antigravity", "this", "idlelib", "turtledemo", "test", "lib2to3", "ensurepip", "pydoc_data"}
SKIP_PARTS = {"test", "tests", "idle_test", "__main__"}
MIN_DOC_CHARS = 20


def _wanted(name: str) -> bool:
    parts = name.split(".")
    if parts[0] == "encodings" and len(parts) > 1:  # ~120 generated codec modules, boilerplate docs
        return False
    if parts[0] in SKIP_TOP:
        return False
    return not any(p.startswith("_") or p in SKIP_PARTS for p in parts)


class _Elided:
    def __repr__(self) -> str:
        return "..."


def _local_strings() -> tuple[str, ...]:
    return (sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix, os.getcwd(), os.path.expanduser("~"))


def _plain(value) -> bool:
    """A default whose repr is short and the same in every process."""
    if type(value) is str and any(local and local in value for local in _local_strings()):
        return False  # e.g. platform.architecture(executable=sys.executable)
    if value is None or type(value) in (bool, int, float, str, bytes):
        return len(repr(value)) <= 40
    if type(value) is tuple:
        return len(value) <= 4 and all(_plain(v) for v in value)
    return False


def _module_text(name: str, mod, seen: set[str]) -> str:
    import inspect

    parts: list[str] = []

    def add(header: str, doc: str | None) -> None:
        if not doc:
            return
        doc = doc.strip().replace(EOS, "")
        if len(doc) < MIN_DOC_CHARS or doc in seen:
            return
        seen.add(doc)
        parts.append(f"{header}\n{doc}")

    def signature(obj) -> str:
        """The signature without annotations, defaults other than plain literals shown as ``...``
        (their reprs hold memory addresses, or even ``os.environ``)."""
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return ""
        params = [p.replace(annotation=p.empty,
                            default=p.default if p.default is p.empty or _plain(p.default) else _Elided())
                  for p in sig.parameters.values()]
        return str(sig.replace(parameters=params, return_annotation=sig.empty))

    add(f"Module {name}", inspect.getdoc(mod))
    members = vars(mod)
    for attr in sorted(members):
        obj = members[attr]
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue  # private, or re-exported from elsewhere
        if inspect.isclass(obj):
            add(f"class {name}.{attr}", inspect.getdoc(obj))
            cls_members = vars(obj)
            for meth_name in sorted(cls_members):
                if meth_name.startswith("_") and meth_name != "__init__":
                    continue
                meth = cls_members[meth_name]
                if isinstance(meth, property):
                    add(f"{attr}.{meth_name}", meth.__doc__)
                    continue
                func = meth.__func__ if isinstance(meth, (staticmethod, classmethod)) else meth
                if inspect.isroutine(func):
                    add(f"{attr}.{meth_name}{signature(func)}", inspect.getdoc(meth))
        elif inspect.isroutine(obj):
            add(f"{name}.{attr}{signature(obj)}", inspect.getdoc(obj))
    return "\n\n".join(parts)


def collect_corpus(out_file: str) -> None:
    """Child-process entry: write {doc_name: text} for pydoc topics and stdlib docstrings."""
    import contextlib
    import importlib
    import io
    import pkgutil
    import pydoc_data.topics
    import warnings

    docs: dict[str, str] = {}
    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key].strip().replace(EOS, "")
        if text:
            docs[f"topic:{key}"] = text

    names: set[str] = set()
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        for top in sorted(sys.stdlib_module_names):
            if not _wanted(top):
                continue
            try:
                mod = importlib.import_module(top)
            except BaseException:  # noqa: BLE001 - platform-specific modules fail to import
                continue
            names.add(top)
            if hasattr(mod, "__path__"):
                for info in pkgutil.walk_packages(mod.__path__, top + ".", onerror=lambda _n: None):
                    if _wanted(info.name):
                        names.add(info.name)
        seen: set[str] = set(docs.values())
        for name in sorted(names):
            try:
                mod = importlib.import_module(name)
            except BaseException:  # noqa: BLE001
                continue
            text = _module_text(name, mod, seen)
            if text:
                docs[f"module:{name}"] = text
    Path(out_file).write_text(json.dumps(docs, sort_keys=True), encoding="utf-8")


def load_corpus(scratch: Path) -> dict[str, str]:
    import subprocess

    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "corpus.json"
    # -I -S: no site-packages, no user site, no PYTHON* variables: the standard library only
    subprocess.run([sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--collect-corpus", str(target)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return json.loads(target.read_text(encoding="utf-8"))


def split_corpus(docs: dict[str, str], heldout_frac: float) -> tuple[list[str], list[str]]:
    """Held-out = documents first in sha256(name) order, up to ``heldout_frac`` of all characters."""
    total = sum(len(t) for t in docs.values())
    order = sorted(docs, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    heldout: list[str] = []
    chars = 0
    for name in order:
        if chars >= heldout_frac * total:
            break
        heldout.append(name)
        chars += len(docs[name])
    held = set(heldout)
    train = sorted(n for n in docs if n not in held)
    return train, sorted(heldout)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    assert tok.token_to_id(EOS) == 0 and tok.get_vocab_size() == vocab_size, "unexpected tokenizer layout"
    return tok


def encode_docs(tok, texts: list[str]) -> list[int]:
    """Each document's tokens followed by eos (the same ids as encoding ``doc + EOS`` text)."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(0)
    return ids


# --------------------------------------------------------------------------------------------
# Model, losses, evaluation
# --------------------------------------------------------------------------------------------


def make_config(args, experts_implementation: str | None = None):
    import transformers as tf

    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return tf.Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_inter,
        intermediate_size=args.expert_inter * args.top_k,  # unused: no dense layers
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=args.max_positions, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
        router_aux_loss_coef=0.0, output_router_logits=False, initializer_range=0.02,
        bos_token_id=None, eos_token_id=0, pad_token_id=None, **extra,
    )


def param_count(args) -> dict[str, int]:
    """Closed-form parameter count (checked against the built model)."""
    h, d, e, i = args.hidden, args.head_dim, args.experts, args.expert_inter
    attn = h * args.heads * d * 2 + h * args.kv_heads * d * 2 + 2 * d
    experts = e * 3 * h * i
    layer = attn + experts + e * h + 2 * h
    embed = args.vocab * h
    total = embed + args.layers * layer + h
    active = embed + args.layers * (attn + args.top_k * 3 * h * i + e * h + 2 * h) + h
    return {"total": total, "embedding": embed, "per_layer": layer, "experts_per_layer": experts,
            "attention_per_layer": attn, "active_per_token": active}


def router_losses(router_logits, top_k: int, floor_share: float = 0.0):
    """Router losses, each computed per layer and averaged over layers:

    * ``bal``: Switch balancing loss ``E * sum_i f_i P_i`` (1.0 when even), f_i the share of the
      layer's top-k assignments that go to expert i, P_i its mean router probability;
    * ``floor``: ``E * sum_i u_i (1/E - P_i)`` with ``u_i = max(0, floor_share - f_i)``: pushes the
      router probability of experts used less than ``floor_share`` up and leaves all others alone,
      so a layer may be skewed but none of its experts dies;
    * ``z``: mean squared log-sum-exp of the router logits;

    plus the per-layer top-k assignment counts."""
    import torch

    bal, floor, z, counts = [], [], [], []
    for logits in router_logits:
        logits = logits.float()
        n_exp = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)
        with torch.no_grad():
            idx = torch.topk(logits, top_k, dim=-1).indices
            c = torch.bincount(idx.reshape(-1), minlength=n_exp).float()
            frac = c / c.sum()
            under = (floor_share - frac).clamp(min=0.0)
        p_mean = probs.mean(0)
        bal.append(n_exp * (frac * p_mean).sum())
        floor.append(n_exp * (under * (1.0 / n_exp - p_mean)).sum())
        z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
        counts.append(c)
    return torch.stack(bal).mean(), torch.stack(floor).mean(), torch.stack(z).mean(), torch.stack(counts)


def windows(ids, seq_len: int):
    """Non-overlapping evaluation windows of seq_len targets (inputs overlap by one token)."""
    import torch

    t = torch.tensor(ids, dtype=torch.long)
    n = (len(ids) - 1) // seq_len
    return torch.stack([t[k * seq_len: k * seq_len + seq_len + 1] for k in range(n)])


def evaluate(model, wins, batch: int, top_k: int) -> dict:
    """Mean next-token CE over all windows and per-layer expert usage (top-k assignment shares)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, n_tok, counts = 0.0, 0, None
    with torch.no_grad():
        for s in range(0, len(wins), batch):
            w = wins[s: s + batch]
            out = model(input_ids=w[:, :-1], output_router_logits=True, use_cache=False)
            ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), w[:, 1:].reshape(-1),
                                 reduction="sum")
            total += ce.item()
            n_tok += w[:, 1:].numel()
            _, _, _, c = router_losses(out.router_logits, top_k)
            counts = c if counts is None else counts + c
    model.train()
    loss = total / n_tok
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n_tok, "usage": usage_stats(counts)}


def usage_stats(counts) -> list[dict]:
    rows = []
    for layer, c in enumerate(counts.tolist()):
        tot = sum(c)
        shares = [x / tot for x in c]
        ent = -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(shares))
        rows.append({"layer": layer, "max_share": max(shares), "max_expert": shares.index(max(shares)),
                     "min_share": min(shares), "min_expert": shares.index(min(shares)),
                     "norm_entropy": ent, "shares": [round(p, 5) for p in shares]})
    return rows


def rounded_copy(model, dtype):
    """The model with every weight rounded to ``dtype`` and computed in fp32 (dymoe's backbone path)."""
    import copy

    import torch

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(dtype).float())
    return m


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def balance_coef_at(step: int, args) -> float:
    """Strong per-layer balancing while the routers form (they collapse early on otherwise), then a
    linear ramp down to a weak final weight that lets each layer settle into its own skew."""
    start, end = args.balance_ramp[0] * args.steps, args.balance_ramp[1] * args.steps
    if step <= start:
        return args.balance_coef
    if step >= end:
        return args.balance_coef_final
    return args.balance_coef + (args.balance_coef_final - args.balance_coef) * (step - start) / (end - start)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def fmt_usage(rows: list[dict]) -> str:
    return " ".join(f"L{r['layer']}:{r['max_share']:.2f}/{r['min_share']:.3f}/{r['norm_entropy']:.2f}" for r in rows)


def train(args) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import random

    import numpy as np
    import tokenizers
    import torch
    import torch.nn.functional as F
    import transformers as tf

    t_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    tf.logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- data
    if args.scratch:
        docs = load_corpus(Path(args.scratch))
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="dymoe-demo-") as tmp:
            docs = load_corpus(Path(tmp))
    train_names, held_names = split_corpus(docs, args.heldout_frac)
    train_texts = [docs[n] for n in train_names]
    held_texts = [docs[n] for n in held_names]
    train_blob = "".join(t + EOS for t in train_texts)
    heldout_blob = "".join(t + EOS for t in held_texts)
    if len(heldout_blob.encode()) > args.heldout_max_bytes:
        raise SystemExit(f"held-out text is {len(heldout_blob.encode())} bytes > --heldout-max-bytes")
    n_topics = sum(n.startswith("topic:") for n in docs)
    data = {
        "python": platform.python_version(), "documents": len(docs), "pydoc_topics": n_topics,
        "module_documents": len(docs) - n_topics, "train_documents": len(train_texts),
        "heldout_documents": len(held_texts), "train_chars": len(train_blob), "heldout_chars": len(heldout_blob),
        "train_sha256": hashlib.sha256(train_blob.encode()).hexdigest(),
        "heldout_sha256": hashlib.sha256(heldout_blob.encode()).hexdigest(),
    }
    log(f"corpus: {len(docs)} documents ({n_topics} pydoc topics), train {len(train_blob) / 1e6:.2f} M chars, "
        f"held-out {len(heldout_blob) / 1e3:.0f} k chars")

    tok = train_tokenizer(train_texts, args.vocab)
    train_ids = encode_docs(tok, train_texts)
    held_ids = encode_docs(tok, held_texts)
    assert tok.encode(heldout_blob, add_special_tokens=False).ids == held_ids, "held-out file would not round-trip"
    data.update(train_tokens=len(train_ids), heldout_tokens=len(held_ids),
                chars_per_token=round(len(train_blob) / len(train_ids), 3))
    log(f"tokenizer: vocab {tok.get_vocab_size()}, train {len(train_ids)} tokens, held-out {len(held_ids)} tokens "
        f"({data['chars_per_token']} chars/token)")

    # ---- model
    cfg = make_config(args, experts_implementation=args.experts_impl)
    model = tf.Qwen3MoeForCausalLM(cfg)
    counts = param_count(args)
    built = sum(p.numel() for p in model.parameters())
    assert built == counts["total"], (built, counts)
    log(f"Qwen3MoeForCausalLM: {built / 1e6:.3f} M parameters ({counts['active_per_token'] / 1e6:.2f} M active "
        f"per token), {2 * built / 1e6:.2f} MB in 16-bit; experts impl {model.config._experts_implementation}")
    model.train()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    seq = args.seq_len
    stream = torch.tensor(train_ids, dtype=torch.long)
    held_wins = windows(held_ids, seq)
    # a fixed train sample the size of the held-out split, to compare train and held-out loss like for like
    gen_eval = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(0, len(train_ids) - seq - 1, (len(held_wins),), generator=gen_eval)
    train_eval_wins = torch.stack([stream[s: s + seq + 1] for s in starts.tolist()])

    gen = torch.Generator().manual_seed(args.seed)
    epoch, batch_queue = 0, []

    def next_batch():
        nonlocal epoch, batch_queue
        if len(batch_queue) < args.batch:
            offset = int(torch.randint(0, seq, (1,), generator=gen))
            n = (len(train_ids) - offset - 1) // seq
            order = torch.randperm(n, generator=gen)
            batch_queue += [offset + int(k) * seq for k in order]
            epoch += 1
        take, batch_queue = batch_queue[: args.batch], batch_queue[args.batch:]
        return torch.stack([stream[s: s + seq + 1] for s in take])

    history, evals = [], []
    tokens_seen, t_train, truncated = 0, time.time(), False
    recent: list[float] = []
    log(f"training {args.steps} steps x {args.batch} x {seq} tokens (~{args.steps * args.batch * seq / 1e6:.2f} M "
        f"tokens, {args.steps * args.batch * seq / len(train_ids):.1f} epochs), cap {args.max_minutes} min")
    step = 0
    for step in range(args.steps):
        if (time.time() - t_train) / 60 > args.max_minutes:
            truncated = True
            log(f"--max-minutes {args.max_minutes} reached at step {step}: stopping early")
            break
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        w = next_batch()
        t0 = time.time()
        out_ = model(input_ids=w[:, :-1], output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out_.logits.float().reshape(-1, cfg.vocab_size), w[:, 1:].reshape(-1))
        bal, floor, z, _ = router_losses(out_.router_logits, cfg.num_experts_per_tok, args.floor_share)
        alpha = balance_coef_at(step, args)
        loss = ce + alpha * bal + args.floor_coef * floor + args.z_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        tokens_seen += w[:, :-1].numel()
        dt = time.time() - t0
        recent.append(ce.item())
        history.append({"step": step + 1, "ce": round(ce.item(), 4), "balance": round(bal.item(), 4),
                        "floor": round(floor.item(), 5), "z": round(z.item(), 3), "lr": lr, "balance_coef": alpha,
                        "grad_norm": round(float(gnorm), 3)})
        if (step + 1) % args.log_every == 0 or step == 0:
            log(f"step {step + 1}/{args.steps} ce {ce.item():.3f} bal {bal.item():.3f} (x{alpha:.3f}) "
                f"floor {floor.item():.4f} z {z.item():.2f} "
                f"lr {lr:.2e} |g| {float(gnorm):.2f} {w[:, :-1].numel() / dt:.0f} tok/s epoch {epoch} "
                f"elapsed {(time.time() - t_train) / 60:.1f} min")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ev = evaluate(model, held_wins[: args.eval_windows], args.eval_batch, cfg.num_experts_per_tok)
            evals.append({"step": step + 1, "heldout_loss": round(ev["loss"], 4),
                          "train_loss_recent": round(sum(recent[-args.log_every:]) / len(recent[-args.log_every:]), 4)})
            log(f"eval step {step + 1}: held-out (first {args.eval_windows} windows) loss {ev['loss']:.3f} "
                f"ppl {ev['ppl']:.1f} | usage max/min/H {fmt_usage(ev['usage'])}")
    steps_done = len(history)
    train_minutes = (time.time() - t_train) / 60

    # ---- final evaluation: fp32 and rounded to bf16 / fp16
    model.eval()
    ev32 = evaluate(model, held_wins, args.eval_batch, cfg.num_experts_per_tok)
    tr32 = evaluate(model, train_eval_wins, args.eval_batch, cfg.num_experts_per_tok)
    by_dtype = {}
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        m = rounded_copy(model, dt)
        by_dtype[name] = evaluate(m, held_wins, args.eval_batch, cfg.num_experts_per_tok)
        del m
    chosen = min(by_dtype, key=lambda k: abs(by_dtype[k]["loss"] - ev32["loss"]))
    log(f"final: train-sample loss {tr32['loss']:.4f}, held-out fp32 {ev32['loss']:.4f} (ppl {ev32['ppl']:.2f}), "
        f"bf16 {by_dtype['bfloat16']['loss']:.4f}, fp16 {by_dtype['float16']['loss']:.4f} -> saving {chosen}")

    # ---- save
    save_dtype = getattr(torch, chosen)
    final = tf.Qwen3MoeForCausalLM(make_config(args))
    final.load_state_dict(model.state_dict())
    final = final.to(save_dtype).eval()
    final.generation_config.eos_token_id = 0
    final.generation_config.bos_token_id = None
    final.generation_config.pad_token_id = 0
    final.save_pretrained(out)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                      model_max_length=args.max_positions)
    fast.save_pretrained(out)
    config_path = out / "tokenizer_config.json"  # the template in the config, where older readers look too
    tok_config = json.loads(config_path.read_text()) | {"chat_template": CHAT_TEMPLATE}
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (out / "heldout.txt").write_text(heldout_blob, encoding="utf-8")
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")

    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)  # save_pretrained writes the weights owner-only
    tensors = check_saved(out, args)
    # the model as shipped, reloaded from disk (computed in fp32), must reproduce the rounded numbers
    reloaded = tf.Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ev_saved = evaluate(reloaded, held_wins, args.eval_batch, cfg.num_experts_per_tok)
    assert abs(ev_saved["loss"] - by_dtype[chosen]["loss"]) < 1e-4, (ev_saved["loss"], by_dtype[chosen]["loss"])
    first = windows(held_ids[: args.test_tokens + 1], seq)
    ev_first = evaluate(reloaded, first, args.eval_batch, cfg.num_experts_per_tok)

    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "args": vars(args), "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": tf.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__, "platform": platform.platform(),
        },
        "data": data, "params": counts, "saved_dtype": chosen, "safetensors_bytes": tensors["bytes"],
        "safetensors_tensors": tensors["count"], "steps_done": steps_done, "truncated": truncated,
        "tokens_seen": tokens_seen, "epochs": round(tokens_seen / len(train_ids), 2),
        "train_minutes": round(train_minutes, 2), "total_minutes": round((time.time() - t_start) / 60, 2),
        "train_ce_last": round(sum(recent[-args.log_every:]) / len(recent[-args.log_every:]), 4),
        "train_sample": {"loss": round(tr32["loss"], 4), "ppl": round(tr32["ppl"], 2), "tokens": tr32["tokens"]},
        "heldout": {"fp32": {"loss": round(ev32["loss"], 4), "ppl": round(ev32["ppl"], 2)},
                    **{k: {"loss": round(v["loss"], 4), "ppl": round(v["ppl"], 2)} for k, v in by_dtype.items()},
                    "saved_reloaded": {"loss": round(ev_saved["loss"], 4), "ppl": round(ev_saved["ppl"], 2)},
                    "tokens": ev32["tokens"]},
        "heldout_first_tokens": {"tokens": args.test_tokens, "loss": round(ev_first["loss"], 4),
                                 "ppl": round(ev_first["ppl"], 2),
                                 "max_share_per_layer": [round(r["max_share"], 4) for r in ev_first["usage"]]},
        "usage_heldout": ev_saved["usage"], "usage_heldout_fp32": ev32["usage"],
        "evals": evals, "history": history,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(report), encoding="utf-8")
    log(f"saved {out} ({tensors['bytes'] / 1e6:.2f} MB {chosen}); total {report['total_minutes']:.1f} min")
    log("held-out usage (max share / min share / normalised entropy): " + fmt_usage(ev_saved["usage"]))


def check_saved(out: Path, args) -> dict:
    from safetensors import safe_open

    path = out / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    for layer in range(args.layers):
        for e in range(args.experts):
            for m in ("gate_proj", "up_proj", "down_proj"):
                k = f"model.layers.{layer}.mlp.experts.{e}.{m}.weight"
                assert k in keys, f"{k} missing: experts were not saved one tensor per expert"
    assert not any("gate_up_proj" in k for k in keys) and "lm_head.weight" not in keys
    size = path.stat().st_size
    assert size <= args.max_bytes, f"model.safetensors is {size} bytes > {args.max_bytes}"
    return {"bytes": size, "count": len(keys)}


PROMPTS = [
    "Return a new list containing",
    "The for statement is used to",
    "class Thread",
    "Open the file and return",
    "A dictionary maps",
    "Raise ValueError if",
]

# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def model_card(r: dict) -> str:
    a, d, p = r["args"], r["data"], r["params"]
    h = r["heldout"]
    mb = r["safetensors_bytes"] / 1e6
    usage_rows = "\n".join(
        f"| {u['layer']} | {u['max_share'] * 100:.1f} % (e{u['max_expert']}) | {u['min_share'] * 100:.2f} % "
        f"(e{u['min_expert']}) | {u['norm_entropy']:.3f} |" for u in r["usage_heldout"])
    evals = "\n".join(f"| {e['step']} | {e['train_loss_recent']:.3f} | {e['heldout_loss']:.3f} |" for e in r["evals"])
    shape = [
        ("layers", f"{a['layers']}, every one MoE (`decoder_sparse_step` 1, no `mlp_only_layers`)"),
        ("hidden size", f"{a['hidden']}"),
        ("attention", f"{a['heads']} query heads, {a['kv_heads']} key/value heads, head_dim {a['head_dim']}, "
                      "RMSNorm per head on q and k, default RoPE (theta 10000), no sliding window"),
        ("experts", f"{a['experts']} routed SwiGLU experts per layer, intermediate {a['expert_inter']}, "
                    f"top-{a['top_k']}, top-k weights renormalised (`norm_topk_prob` true), no shared expert"),
        ("vocabulary", f"{a['vocab']} (byte-level BPE), embeddings tied with the LM head"),
        ("context", f"trained on {a['seq_len']}-token windows; `max_position_embeddings` {a['max_positions']}"),
        ("parameters", f"{p['total']:,} total: {p['experts_per_layer']:,} in the experts of each layer, "
                       f"{p['attention_per_layer']:,} in each attention, {p['embedding']:,} in the tied embedding; "
                       f"{p['active_per_token']:,} active per token"),
        ("file", f"`model.safetensors`, {r['saved_dtype']}, {mb:.2f} MB, {r['safetensors_tensors']} tensors, one "
                 "per expert matrix (`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`)"),
    ]
    shape_rows = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in shape)
    results = [
        (f"train, mean of the last {a['log_every']} steps", r["train_ce_last"], math.exp(r["train_ce_last"])),
        (f"train sample ({r['train_sample']['tokens']:,} tokens, final weights, fp32)",
         r["train_sample"]["loss"], r["train_sample"]["ppl"]),
        ("held-out, fp32", h["fp32"]["loss"], h["fp32"]["ppl"]),
        ("held-out, weights rounded to bf16", h["bfloat16"]["loss"], h["bfloat16"]["ppl"]),
        ("held-out, weights rounded to fp16", h["float16"]["loss"], h["float16"]["ppl"]),
        (f"held-out, shipped file reloaded ({r['saved_dtype']}, computed in fp32)",
         h["saved_reloaded"]["loss"], h["saved_reloaded"]["ppl"]),
    ]
    result_rows = "| | loss | perplexity |\n|---|---|---|\n" + "\n".join(
        f"| {k} | {loss:.4f} | {ppl:.2f} |" for k, loss, ppl in results)
    us = r["usage_heldout"]
    even = max(us, key=lambda u: u["norm_entropy"])
    skewed = min(us, key=lambda u: u["norm_entropy"])
    usage_summary = (
        f"Across layers the most used expert takes {min(u['max_share'] for u in us) * 100:.1f}-"
        f"{max(u['max_share'] for u in us) * 100:.1f} % of the assignments and the least used "
        f"{min(u['min_share'] for u in us) * 100:.2f}-{max(u['min_share'] for u in us) * 100:.2f} %"
        + (": no layer has collapsed and no expert is dead. "
           if max(u["max_share"] for u in us) < 0.5 and min(u["min_share"] for u in us) > 0.01
           else " (**check the routing: some layer is collapsed or has a nearly dead expert**). ")
        + f"Layer {even['layer']} is the most even "
        f"(entropy {even['norm_entropy']:.3f}), layer {skewed['layer']} the most skewed "
        f"({skewed['norm_entropy']:.3f}).")
    trunc = (" **Stopped early by `--max-minutes`** after "
             f"{r['steps_done']} of {a['steps']} steps." if r["truncated"] else "")
    return f"""# dymoe demo model: Qwen3-MoE, {a['layers']} layers x {a['experts']} experts (top-{a['top_k']})

A tiny mixture-of-experts language model trained from scratch on English text that ships with
Python itself (the `help()` topics and the standard library's docstrings). It exists so that
dymoe's export, quantization and expert-orchestration paths run on a model whose routing and
perplexity mean something; it is not a useful assistant. It continues Python-documentation-style
text.

## Architecture

`transformers.Qwen3MoeForCausalLM` (`model_type` `qwen3_moe`), chosen over Mixtral because:

- it is the architecture of the fine-grained many-expert models dymoe targets (Qwen3-30B-A3B:
  128 small experts, top-8), which 16 small experts at top-2 imitate better than Mixtral's
  8 large ones;
- its per-head RMSNorm on q and k (`q_norm`/`k_norm`) keeps attention logits bounded, which
  lets a tiny model train stably at a high learning rate in a short CPU budget;
- `head_dim` is explicit and `norm_topk_prob` configurable, and the export path then also
  exercises dymoe's `qk_norm="head"` graphs.

{shape_rows}

## Data

- `pydoc_data.topics.topics` ({d['pydoc_topics']} help texts) and the docstrings of
  {d['module_documents']} standard-library modules: each module's own docstring and those of the
  public classes, methods (with `__init__`) and functions it defines (re-exports skipped), with a
  header line naming each object and its signature. Collected in a child `python -I -S`, so only
  the standard library is importable; modules whose import has side effects or that are tests or
  tools (`antigravity`, `this`, `idlelib`, `turtledemo`, `test`, `lib2to3`, `ensurepip`), private
  modules and the generated codec modules `encodings.*` are skipped. Exact duplicate docstrings are
  kept once; documents are sorted by name.
- Split: documents ordered by sha256 of their name (`topic:KEY`, `module:NAME`); the first ones
  up to {a['heldout_frac'] * 100:.0f} % of all characters are held out. Neither the model nor the
  tokenizer saw them. They are shipped as `heldout.txt` (each document followed by
  `{EOS}`; encoding the file gives exactly the evaluation token stream).
- Sizes: {d['documents']} documents; train {d['train_documents']} documents,
  {d['train_chars']:,} characters, {d['train_tokens']:,} tokens ({d['chars_per_token']} characters
  per token); held-out {d['heldout_documents']} documents, {d['heldout_chars']:,} characters,
  {d['heldout_tokens']:,} tokens.
- Python {d['python']}. The text differs slightly between Python versions; sha256 of the training
  text (documents each followed by `{EOS}`, UTF-8): `{d['train_sha256']}`; of `heldout.txt`:
  `{d['heldout_sha256']}`.

## Tokenizer

`tokenizer.json`: byte-level BPE trained with `tokenizers` (`ByteLevel` pre-tokenizer without
prefix space and decoder, `BpeTrainer`, vocab {a['vocab']}, min frequency 2) on the training split
only. `{EOS}` is id 0, the only special token; it separates documents and is the config's
`eos_token_id`. There is no bos token (`bos_token_id` null). `tokenizer_config.json` makes it
loadable with `AutoTokenizer` and holds a plain question/answer chat template
(`Question: ...` / `Answer:`) for `dymoe serve`'s chat endpoint; the model is not chat-tuned.

## Training

- Loss: next-token cross-entropy (from the logits; no labels are passed, and
  `router_aux_loss_coef` is 0, so transformers' auxiliary loss, which balances the concatenation of
  all layers and so lets single layers collapse, is off) + three router terms, each computed for
  every layer separately and averaged over layers, so that no single layer can collapse while the
  others stay balanced:
  - alpha x Switch balancing loss `E * sum_i f_i * P_i` (f_i: share of the layer's top-{a['top_k']}
    assignments going to expert i, P_i: its mean router probability; 1.0 when even);
  - {a['floor_coef']} x floor loss `E * sum_i u_i * (1/E - P_i)`, `u_i = max(0, {a['floor_share']} - f_i)`:
    it raises the router probability of experts used less than {a['floor_share'] * 100:.0f} % of the
    time and leaves every other expert alone, so experts stay alive without forcing evenness;
  - {a['z_coef']} x router z-loss (mean squared log-sum-exp of the router logits).
- Balancing weight alpha: {a['balance_coef']} for the first {a['balance_ramp'][0] * 100:.0f} % of the
  steps, then a linear ramp down to {a['balance_coef_final']} at {a['balance_ramp'][1] * 100:.0f} %,
  constant after. Early on the routers collapse quickly (within ~20 steps all tokens of a layer
  agree on the same two experts: the normalised hidden states still share one dominant direction);
  the strong weight undoes that. Kept strong to the end it makes every layer almost perfectly even
  (normalised entropy 0.994-0.998 in a run with 0.1 throughout), which would make
  expert-frequency-aware policies pointless on this model. A weak final weight alone (0.02, no
  floor loss) let an expert of layer 0 fade to 0.4 % of the assignments; 0.01 with the floor gave
  entropies 0.98-0.996. The shipped recipe drops the balancing loss once the routers have formed
  and relies on the floor loss alone to keep every expert alive, so the skew below is the model's
  own.
- AdamW (betas 0.9/0.95, weight decay {a['weight_decay']} on matrices, none on norms), peak learning
  rate {a['lr']}, {a['warmup']} warm-up steps then cosine decay to {a['min_lr_ratio']} x peak,
  gradient clipping {a['clip']}; {a['steps']} steps of {a['batch']} x {a['seq_len']} tokens
  ({r['tokens_seen']:,} tokens seen, {r['epochs']} epochs); windows drawn without replacement per
  epoch from the packed training stream at a random offset.
- Seed {a['seed']} (python, numpy, torch), `torch.use_deterministic_algorithms(True)`,
  {a['threads']} torch threads, experts run with transformers' `{a['experts_impl']}` implementation
  during training. fp32 on CPU.
- Wall time: {r['train_minutes']:.1f} min training, {r['total_minutes']:.1f} min in all, on 2 CPU cores
  shared with other jobs (throughput swung between about 300 and 3000 tokens/s with their load;
  `--max-minutes {a['max_minutes']:g}` stops training cleanly and still saves, and this card then
  says so).{trunc}
- Versions: Python {r['versions']['python']}, torch {r['versions']['torch']}, transformers
  {r['versions']['transformers']}, tokenizers {r['versions']['tokenizers']}.

## Results

{result_rows}

Held-out: {h['tokens']:,} target tokens in {a['seq_len']}-token windows. A uniform guess over the
vocabulary has perplexity {a['vocab']}. The saved dtype is the one whose held-out loss stays closer to
fp32. The first {r['heldout_first_tokens']['tokens']} tokens of `heldout.txt` in {a['seq_len']}-token windows (what
`tests/test_demo_model.py` checks) give loss {r['heldout_first_tokens']['loss']:.4f}, perplexity
{r['heldout_first_tokens']['ppl']:.2f}.

Learning curve (train: mean of the previous {a['log_every']} steps; held-out: the first
{a['eval_windows']} windows, {a['eval_windows'] * a['seq_len']:,} tokens, except for the final row, which is the
whole split):

| step | train loss | held-out loss |
|---|---|---|
{evals}
| {r['steps_done']} (final) | {r['train_ce_last']:.3f} | {h['fp32']['loss']:.3f} |

## Expert usage per layer (held-out split, shipped weights)

Share of the top-{a['top_k']} assignments that go to the most and the least used expert, and the
entropy of the layer's usage distribution divided by log({a['experts']}) (1 = perfectly even).
Uniform usage would give every expert {100 / a['experts']:.2f} %. The full per-expert shares are in
`training_report.json` (`usage_heldout`).

| layer | most used | least used | normalised entropy |
|---|---|---|---|
{usage_rows}

{usage_summary}

## Use

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("models/demo")
model = AutoModelForCausalLM.from_pretrained("models/demo", dtype=torch.float32)  # file is {r['saved_dtype']}
ids = tok("Return a new list containing", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

```bash
dymoe export models/demo --out bundles/demo && dymoe run bundles/demo --prompt "Return a new list containing"
```

## Files

`config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json`, `heldout.txt` (held-out split), `prompts.txt` (a few demo prompts),
`training_report.json` (arguments, versions, data facts, loss history, usage), this card.

## Reproduce

```bash
. .venv/bin/activate
nice -n 10 {r['command']}
```

The same Python and library versions give the same data hashes and, on the same CPU type, the
same weights (two runs of the script, shortened to 3 steps, wrote byte-identical
`model.safetensors`); other Python versions give slightly different text (compare the sha256
above).
"""


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="models/demo", help="output folder")
    ap.add_argument("--scratch", default=None, help="keep the collected corpus (corpus.json) in this folder")
    ap.add_argument("--collect-corpus", default=None, help=argparse.SUPPRESS)
    g = ap.add_argument_group("shape")
    g.add_argument("--layers", type=int, default=7)
    g.add_argument("--hidden", type=int, default=192)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=48)
    g.add_argument("--experts", type=int, default=16)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--expert-inter", type=int, default=64)
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--max-positions", type=int, default=256, help="max_position_embeddings (= training length)")
    g = ap.add_argument_group("data")
    g.add_argument("--heldout-frac", type=float, default=0.05)
    g.add_argument("--heldout-max-bytes", type=int, default=200_000)
    g = ap.add_argument_group("training")
    g.add_argument("--steps", type=int, default=800)
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float, default=1.5e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=60)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--balance-coef", type=float, default=0.2, help="per-layer balancing loss weight, early")
    g.add_argument("--balance-coef-final", type=float, default=0.0, help="... and after the ramp")
    g.add_argument("--balance-ramp", type=float, nargs=2, default=(0.3, 0.5), metavar=("FROM", "TO"),
                   help="fractions of --steps between which the balancing weight ramps down linearly")
    g.add_argument("--floor-share", type=float, default=0.02, help="experts below this share are pushed up")
    g.add_argument("--floor-coef", type=float, default=0.5, help="weight of that floor loss")
    g.add_argument("--z-coef", type=float, default=1e-3, help="router z-loss weight")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation for training")
    g.add_argument("--max-minutes", type=float, default=38.0, help="stop training cleanly (and save) after this")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--eval-batch", type=int, default=16)
    g.add_argument("--eval-windows", type=int, default=64, help="held-out windows in the periodic evaluations")
    g = ap.add_argument_group("checks")
    g.add_argument("--max-bytes", type=int, default=12_000_000, help="limit for model.safetensors")
    g.add_argument("--test-tokens", type=int, default=2048, help="first held-out tokens the tests evaluate")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.collect_corpus:
        collect_corpus(args.collect_corpus)
        return
    train(args)


if __name__ == "__main__":
    main()
