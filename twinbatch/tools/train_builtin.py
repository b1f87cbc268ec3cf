"""Trains the built-in model: a small DeepSeek-V2 (MLA, a dense first layer, routed experts with top-2 and a
shared expert) on the arithmetic word problems of tools/arith.py, with transformers' own DeepseekV2ForCausalLM,
and writes a Hugging Face checkpoint (config.json, model.safetensors in bfloat16, tokenizer.json).

    python -m twinbatch.tools.train_builtin --out DIR [--minutes 8] [--device cuda]

The tokenizer is a byte-level BPE trained on the training problems with the `tokenizers` library, digits split
one a token, so the embedding stays small. Documents are gsm8k's zero-shot format, `Question: ...\\nAnswer: ...`
with the worked solution and `#### N`, between <s> and </s>, packed into fixed-length rows. Seeded: the data,
the initialisation and the order of batches are the same on every run (GPU kernels may still add in another
order).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from twinbatch.tools.arith import answer_of, split, train_problems

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Fits in 16 MB of bfloat16 with a vocabulary of 512; 8 routed experts, which 2 and 4 divide.
MODEL: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=768, moe_intermediate_size=256, num_hidden_layers=4, first_k_dense_replace=1,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, topk_method="greedy", routed_scaling_factor=1.0,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)  # fmt: skip


def document(p: dict[str, str]) -> str:
    """One problem as the model sees it, in lm-eval's gsm8k zero-shot format (its target delimiter a space)."""
    return f"Question: {p['question']}\nAnswer: {p['answer']}"


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE with one token per digit; encodes <s> + text (the model's prompts start with <s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], initial_alphabet=alphabet,
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def batches(tokenizer: Any, batch_size: int, seq_len: int) -> Any:
    """Endless [batch_size, seq_len] rows of training documents packed back to back, each <s> ... </s>."""
    stream = train_problems()
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size * seq_len:
            docs = [document(next(stream)) for _ in range(256)]
            for ids in tokenizer(docs)["input_ids"]:
                buffer += [*ids, eos]
        rows, buffer = buffer[: batch_size * seq_len], buffer[batch_size * seq_len :]
        yield torch.tensor(rows).view(batch_size, seq_len)


def build_model(tokenizer: Any, overrides: dict[str, Any] | None = None) -> Any:
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    config = DeepseekV2Config(**(MODEL | (overrides or {})), vocab_size=len(tokenizer),
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class RouterBalance:
    """The switch-transformer load-balancing loss, which transformers' DeepSeek-V2 does not compute: for each MoE
    layer, experts x sum over experts of (share of the token slots routed to it) x (its mean router probability).
    1 when balanced. Without it the routers may send nearly everything to a few experts, and the checkpoint would
    leave some experts, and under expert parallelism some ranks, without traffic. Also keeps each expert's share
    of the slots, last step's, for the report."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.losses: list[torch.Tensor] = []
        self.shares: list[list[float]] = []
        for module in model.modules():
            if type(module).__name__ == "DeepseekV2TopkRouter":
                module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, out: tuple[torch.Tensor, ...]) -> None:
        logits, _, indices = out
        experts = logits.shape[-1]
        share = torch.bincount(indices.flatten(), minlength=experts).float() / indices.numel()
        self.losses.append(experts * (share * logits.float().softmax(-1).mean(0)).sum())
        self.shares.append(share.tolist())

    def take(self) -> torch.Tensor:
        """The mean over layers of this step's losses; forgets them."""
        loss = torch.stack(self.losses).mean()
        self.losses, self.shares = [], self.shares[-len(self.losses) :]
        return loss


def train(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """-> a report: steps, tokens, seconds, first and last losses, each MoE layer's expert shares at the end."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    corpus = [document(p) for p in itertools.islice(train_problems(), args.tokenizer_docs)]
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    model = build_model(tokenizer, overrides).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = batches(tokenizer, args.batch_size, args.seq_len)
    balance = RouterBalance(model)
    start, losses, step = time.monotonic(), [], 0
    while step < args.max_steps and time.monotonic() - start < 60 * args.minutes:
        # warm-up, then a cosine to zero over the steps or the minutes, whichever runs out first
        progress = max(step / args.max_steps, (time.monotonic() - start) / (60 * args.minutes))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = next(data).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        (loss + args.balance_coef * balance.take()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if args.log_every and step % args.log_every == 0:
            print(f"step {step}: loss {losses[-1]:.4f}, lr {lr:.2e}, {time.monotonic() - start:.0f} s", flush=True)
    out = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"steps": step, "tokens": step * args.batch_size * args.seq_len, "seconds": time.monotonic() - start,
              "first_loss": losses[0], "last_loss": losses[-1], "expert_shares": balance.shares,
              "args": vars(args) | {"out": str(out)}}  # fmt: skip
    (out / "training.json").write_text(json.dumps(report, indent=1))
    return report


def evaluate(model_dir: str | Path, num: int, **engine_args: Any) -> dict[str, Any]:
    """Greedy exact-match accuracy on the first `num` held-out problems, answers extracted as gsm8k's strict
    match does (the number after `#### `), through the engine."""
    from twinbatch.entrypoints.llm import LLM
    from twinbatch.sampling_params import SamplingParams

    held_out = split("test", num)
    llm = LLM(str(model_dir), **({"max_model_len": 512} | engine_args))
    params = SamplingParams(temperature=0.0, max_tokens=128, stop=["Question:"])
    outs = llm.generate([f"Question: {p['question']}\nAnswer:" for p in held_out], params, use_tqdm=False)
    right = [answer_of(o.outputs[0].text) == answer_of(p["answer"]) for o, p in zip(outs, held_out, strict=True)]
    return {"problems": num, "exact_match": sum(right) / num}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the checkpoint directory to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=8.0, help="stop after this long (or --max-steps)")
    p.add_argument("--max-steps", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--tokenizer-docs", type=int, default=20_000, help="training problems the tokenizer learns from")
    p.add_argument("--balance-coef", type=float, default=0.01, help="weight of the routers' load-balancing loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-problems", type=int, default=100, help="held-out problems to score at the end (0: none)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    report = train(args)
    if args.eval_problems:
        report["eval"] = evaluate(args.out, args.eval_problems, device=args.device)
        (Path(args.out) / "training.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "args"}))


if __name__ == "__main__":
    main()
