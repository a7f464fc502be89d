"""What each Ray Train worker runs: train the reward model, then PPO and/or DPO on the policy.

Every worker holds a full copy of each model (135M parameters fit anywhere); data is sharded by
rank and gradients are averaged by DDP (``ray.train.torch.prepare_model``), so one worker or
several give the same algorithm. Rank 0 writes the checkpoints and the final policy into the
run directory; a restarted job finds them and continues where it stopped (the reward model
is not retrained, PPO resumes at its last saved step, a finished DPO policy is kept; an
unfinished DPO phase starts over). ``hp["algorithm"]`` (``ppo``, ``dpo`` or ``both``) picks the
policy trainers; the reward model is trained either way (its accuracy is in every report and
the evaluation scores each child with it).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlhf import dpo, ppo, quiz, validation
from rlhf.config import extrapolation_factors
from rlhf.reward import RewardModel, pairwise_loss, position_ids

RM_CHECKPOINT = "reward_model.pt"
PPO_CHECKPOINT = "ppo.pt"
POLICY_DIR = "policy-hf"  # the PPO child
DPO_POLICY_DIR = "policy-dpo-hf"  # the DPO child
POLICY_DIRS = {"ppo": POLICY_DIR, "dpo": DPO_POLICY_DIR}
METRICS_FILE = "metrics.json"


# ----------------------------------------------------------------- tokens
class Encoder:
    """Prompt and answer token ids with the model's own tokenizer (``tokenizer.json``)."""

    def __init__(self, tokenizer_file: Path, max_prompt_tokens: int, max_answer_tokens: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.eos = self.tokenizer.token_to_id("<|im_end|>")
        self.max_prompt = max_prompt_tokens
        self.max_answer = max_answer_tokens

    def prompt(self, text: str) -> list[int]:
        """The prompt as the model saw it; cut from the left so the question and the assistant
        header (at the end) survive."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids[-self.max_prompt:]

    def answer(self, text: str, ended: bool = True) -> list[int]:
        """The answer followed by ``<|im_end|>`` where the model ended it; an answer cut short
        (``ended=False``: max_tokens, output moderation) is its tokens alone, so a policy's
        log-probability of it holds no end token the model never chose. The reward model reads its
        score at an ``<|im_end|>`` and always gets one (as :func:`with_final_eos` gives it)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ended:
            return ids[:self.max_answer]
        return [*ids[:self.max_answer - 1], self.eos]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos])


def pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` padded to the longest row (left padding for generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def response_mask(response: torch.Tensor, eos: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first ``<|im_end|>``, 0 after it."""
    is_eos = (response == eos).long()
    ended_before = torch.cumsum(is_eos, dim=1) - is_eos  # eos tokens strictly before t
    return (ended_before == 0).long()


def with_final_eos(seq: torch.Tensor, attn: torch.Tensor, rmask: torch.Tensor,
                   eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's view of sampled answers: as in training (``Encoder.answer``), every
    answer ends with ``<|im_end|>``, so one cut off at ``max_new_tokens`` gets it appended
    (a column with attention 1 on those rows only) and the score is read off that token, as
    for the cut-off labelled answers, rather than off a mid-sentence token it never saw scored."""
    ended = ((seq[:, -rmask.shape[1]:] == eos) & rmask.bool()).any(dim=1)
    extra = torch.full((seq.shape[0], 1), eos, dtype=seq.dtype, device=seq.device)
    return torch.cat([seq, extra], dim=1), torch.cat([attn, (~ended).long().unsqueeze(1).to(attn.dtype)], dim=1)


# ----------------------------------------------------------------- models
def load_lm(hf_dir: Path) -> Any:
    """The float32 causal LM of a checkpoint directory."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)


class PolicyWithValue(nn.Module):
    """The policy LM and a value head on the same hidden states (one forward gives both)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (lm.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        return self.lm.lm_head(hidden).float(), self.value_head(hidden).squeeze(-1).float()


def train_only_top_layers(body: nn.Module, layers: int) -> None:
    """Leave only the top ``layers`` decoder layers and the final norm of a transformer body
    trainable (``0``: everything). A CPU-sized setting: the embeddings (tied to the LM head)
    and the lower layers stay as the parent had them, and backward stops at the first
    trainable layer. Heads added on top (reward, value) are trained either way."""
    if layers <= 0:
        return
    body.requires_grad_(False)
    for layer in body.layers[-layers:]:
        layer.requires_grad_(True)
    body.norm.requires_grad_(True)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_for(model: nn.Module, head: nn.Module, lr: float, head_lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; the freshly initialised scalar ``head`` (reward or value)
    at ``head_lr`` (0: the same ``lr``), since a few steps at a fine-tuning rate barely move it."""
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in trainable(model) if id(p) not in head_ids]
    return torch.optim.AdamW([{"params": body, "lr": lr},
                              {"params": list(head.parameters()), "lr": head_lr or lr}])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum across workers (identity with one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------- reward model
def comparison_batch(items: Sequence[dict[str, Any]], enc: Encoder) -> tuple[torch.Tensor, torch.Tensor, list]:
    """All answers of the batch's comparisons as right-padded rows, and each element's pairs."""
    rows: list[list[int]] = []
    groups: list[list[tuple[int, int]]] = []
    for item in items:
        prompt = enc.prompt(item["prompt"])
        offset = len(rows)
        rows.extend(prompt + enc.answer(a) for a in item["answers"])
        groups.append([(offset + b, offset + w) for b, w in item["pairs"]])
    ids, mask = pad(rows, enc.eos, left=False)
    return ids, mask, groups


def shard_batches(n: int, batch_size: int, rank: int, world: int, seed: int) -> list[list[int]]:
    """This worker's batches of one epoch: same count on every worker (DDP needs it)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    per_step = batch_size * world
    steps = max(1, -(-n // per_step))
    order = (order * (steps * per_step // max(n, 1) + 1))[: steps * per_step]
    return [order[s * per_step + rank * batch_size: s * per_step + (rank + 1) * batch_size] for s in range(steps)]


def evaluate_reward_model(rm: nn.Module, items: Sequence[dict[str, Any]], enc: Encoder, rank: int, world: int,
                          device: torch.device, batch_size: int) -> dict[str, float]:
    """Pair accuracy and loss on ``items`` (sharded, summed over workers)."""
    rm.eval()
    correct = pairs = 0
    loss_sum = elements = 0.0
    mine = list(items)[rank::world]
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            ids, mask, groups = comparison_batch(mine[start:start + batch_size], enc)
            result = pairwise_loss(unwrap(rm)(ids.to(device), mask.to(device)), groups)
            correct += result.correct
            pairs += result.pairs
            n = sum(1 for g in groups if g)
            loss_sum += result.loss.item() * n
            elements += n
    correct, pairs, loss_sum, elements = _all_sum([correct, pairs, loss_sum, elements], device)
    rm.train()
    # None (not 0) when there is nothing to measure: an empty held-out set is not a 0 % model.
    return {"accuracy": correct / pairs if pairs else None, "loss": loss_sum / elements if elements else None,
            "pairs": int(pairs)}


def train_reward_model(cfg: dict[str, Any], enc: Encoder, device: torch.device, rank: int, world: int,
                       report: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Phase 1: fit the reward model on the training comparisons; held-out pair accuracy."""
    from ray.train.torch import prepare_model

    run_dir = Path(cfg["run_dir"])
    hp = cfg["hp"]
    rm = RewardModel.from_causal_lm(load_lm(Path(cfg["base_hf_dir"])))
    checkpoint = run_dir / RM_CHECKPOINT
    if checkpoint.is_file():  # resumed run: phase 1 is done
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        rm.load_state_dict(saved["state"])
        rm.to(device).eval()
        report({**saved["metrics"], "phase": "reward_model", "resumed": 1.0})
        return rm, saved["metrics"]
    started = time.perf_counter()
    train_only_top_layers(rm.body, hp.get("train_layers", 0))
    rm = prepare_model(rm)
    optimizer = optimizer_for(rm, unwrap(rm).head, hp["rm_lr"], hp.get("head_lr", 0.0))
    train, held = cfg["train"], cfg["held_out"]
    last_loss = 0.0
    # Train accuracy, loss and the score offset are measured on the last epoch's batches as they
    # pass (before each update), not by another pass over the data: a pass costs minutes on CPU.
    correct = pairs = 0
    loss_sum = elements = score_sum = scores_seen = 0.0
    for epoch in range(hp["rm_epochs"]):
        last_epoch = epoch == hp["rm_epochs"] - 1
        for batch in shard_batches(len(train), hp["rm_batch_size"], rank, world, hp["seed"] + epoch):
            ids, mask, groups = comparison_batch([train[i] for i in batch], enc)
            scores = rm(ids.to(device), mask.to(device))
            result = pairwise_loss(scores, groups)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable(rm), hp["max_grad_norm"])
            optimizer.step()
            last_loss = result.loss.item()
            if last_epoch:
                correct += result.correct
                pairs += result.pairs
                n = sum(1 for g in groups if g)
                loss_sum += last_loss * n
                elements += n
                score_sum += float(scores.detach().sum())
                scores_seen += scores.numel()
    correct, pairs, loss_sum, elements, score_sum, scores_seen = _all_sum(
        [correct, pairs, loss_sum, elements, score_sum, scores_seen], device)
    held_eval = evaluate_reward_model(rm, held, enc, rank, world, device, hp["rm_batch_size"])
    # Centre the scores on the training answers so PPO's rewards start near zero.
    offset = score_sum / scores_seen if scores_seen else 0.0
    metrics = {"reward_model_accuracy": held_eval["accuracy"], "reward_model_loss": held_eval["loss"],
               "reward_model_train_accuracy": correct / pairs if pairs else None,
               "reward_model_train_loss": loss_sum / elements if elements else None,
               "reward_model_last_batch_loss": last_loss,
               "heldout_pairs": held_eval["pairs"], "train_pairs": int(pairs), "reward_offset": offset,
               "reward_model_seconds": time.perf_counter() - started}
    rm = unwrap(rm)
    rm.eval()
    if rank == 0:
        _save_atomic({"state": rm.state_dict(), "metrics": metrics}, checkpoint)
    _barrier()
    report({**metrics, "phase": "reward_model"}, phase_seconds={"reward_model": metrics["reward_model_seconds"]})
    return rm, metrics


# ----------------------------------------------------------------- PPO
def sample_answers(lm: nn.Module, prompts: Sequence[str], enc: Encoder, hp: dict[str, Any],
                   device: torch.device | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pure sampling at `hp["temperature"]` (no top-k/top-p: PPO's log-probs are of this policy).

    Returns the sequences, their attention mask, the answers, the answers' mask (up to and
    including the first EOS) and the prompt width (prompts are left-padded to it).
    """
    ids, pmask = pad([enc.prompt(p) for p in prompts], enc.eos, left=True)
    if device is not None:
        ids, pmask = ids.to(device), pmask.to(device)
    width = ids.shape[1]
    out = lm.generate(input_ids=ids, attention_mask=pmask, do_sample=True, temperature=hp["temperature"],
                      top_k=0, top_p=1.0, max_new_tokens=hp["max_new_tokens"], pad_token_id=enc.eos,
                      eos_token_id=enc.eos)
    response = out[:, width:]
    rmask = response_mask(response, enc.eos)
    return out, torch.cat([pmask, rmask], dim=1), response, rmask, width


def rollout(policy: nn.Module, reference: nn.Module, rm: nn.Module, prompts: Sequence[str], enc: Encoder,
            hp: dict[str, Any], reward_offset: float, device: torch.device) -> dict[str, torch.Tensor]:
    """Sample answers from the policy and score them: everything PPO's epochs need, detached."""
    lm = unwrap(policy).lm
    with torch.no_grad():
        seq, attn, response, rmask, width = sample_answers(lm, prompts, enc, hp, device)
        logits, values = unwrap(policy)(seq, attn)
        logits = logits[:, width - 1:-1]
        logprobs = ppo.logprobs_from_logits(logits, response)
        entropy = ppo.masked_mean(ppo.entropy_from_logits(logits), rmask)
        values = values[:, width - 1:-1]
        ref_logits, _ = reference(seq, attn)
        ref_logprobs = ppo.logprobs_from_logits(ref_logits[:, width - 1:-1], response)
        scores = rm(*with_final_eos(seq, attn, rmask, enc.eos)) - reward_offset
    rewards, kl = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, rmask, hp["kl_coef"])
    advantages, returns = ppo.gae(rewards, values, rmask, hp["gamma"], hp["lam"])
    advantages = ppo.masked_whiten(advantages, rmask)
    return {"seq": seq, "attn": attn, "response": response, "mask": rmask, "logprobs": logprobs,
            "values": values, "advantages": advantages, "returns": returns, "scores": scores,
            "kl": kl.sum(1), "entropy": entropy, "width": torch.tensor(width)}


def ppo_update(policy: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               hp: dict[str, Any], step_seed: int, device: torch.device) -> dict[str, float]:
    """Several PPO epochs over one rollout batch, stopping early past the KL bound."""
    width = int(batch["width"])
    n = batch["seq"].shape[0]
    rng = random.Random(step_seed)
    stats: dict[str, float] = {}
    epochs_run = 0
    for _ in range(hp["ppo_epochs"]):
        order = list(range(n))
        rng.shuffle(order)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0,
                "value_clip_fraction": 0.0}
        minibatches = 0
        for start in range(0, n, hp["minibatch_size"]):
            idx = torch.tensor(order[start:start + hp["minibatch_size"]], device=device)
            logits, values = policy(batch["seq"][idx], batch["attn"][idx])
            logprobs = ppo.logprobs_from_logits(logits[:, width - 1:-1], batch["response"][idx])
            values = values[:, width - 1:-1]
            mask = batch["mask"][idx]
            pl = ppo.policy_loss(logprobs, batch["logprobs"][idx], batch["advantages"][idx], mask, hp["clip_range"])
            vl, vclip = ppo.value_loss(values, batch["values"][idx], batch["returns"][idx], mask,
                                       hp["clip_range_value"])
            loss = pl.loss + hp["vf_coef"] * vl
            if hp["ent_coef"]:
                loss = loss - hp["ent_coef"] * ppo.masked_mean(ppo.entropy_from_logits(logits[:, width - 1:-1]), mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable(policy), hp["max_grad_norm"])
            optimizer.step()
            for key, value in (("policy_loss", pl.loss), ("value_loss", vl), ("clip_fraction", pl.clip_fraction),
                               ("approx_kl", pl.approx_kl), ("value_clip_fraction", vclip)):
                sums[key] += float(value.detach())
            minibatches += 1
        totals = _all_sum([*sums.values(), float(minibatches)], device)
        stats = {key: total / totals[-1] for key, total in zip(sums, totals[:-1], strict=True)}
        epochs_run += 1
        if stats["approx_kl"] > hp["target_kl"]:
            break
    stats["ppo_epochs_run"] = float(epochs_run)
    return stats


def train_ppo(cfg: dict[str, Any], rm: nn.Module, rm_metrics: dict[str, Any], enc: Encoder, device: torch.device,
              rank: int, world: int, report: Any) -> tuple[list[dict[str, float]], float]:
    """Phase 2: PPO steps (rollout, score, GAE, clipped epochs), checkpointed for resumption."""
    from ray.train.torch import prepare_model

    run_dir = Path(cfg["run_dir"])
    hp = cfg["hp"]
    base = Path(cfg["base_hf_dir"])
    policy = PolicyWithValue(load_lm(base))
    reference = PolicyWithValue(load_lm(base)).to(device).eval()
    reference.requires_grad_(False)
    rm.requires_grad_(False)
    history: list[dict[str, float]] = []
    first_step = 0
    optimizer_state = None
    checkpoint = run_dir / PPO_CHECKPOINT
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        policy.load_state_dict(saved["policy"])
        optimizer_state = saved["optimizer"]
        history = saved["history"]
        first_step = hp["ppo_steps"] if saved.get("stopped_at_kl_bound") else saved["step"]
    train_only_top_layers(policy.lm.model, hp.get("train_layers", 0))
    policy = prepare_model(policy)
    optimizer = optimizer_for(policy, unwrap(policy).value_head, hp["lr"], hp.get("head_lr", 0.0))
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    prompts = cfg["prompts"]
    started = time.perf_counter() - sum(h.get("step_seconds", 0.0) for h in history)
    for step in range(first_step, hp["ppo_steps"]):
        step_start = time.perf_counter()
        rng = random.Random(hp["seed"] * 1_000_003 + step * world + rank)
        chosen = [prompts[rng.randrange(len(prompts))] for _ in range(hp["rollout_batch_size"])]
        torch.manual_seed(hp["seed"] * 7919 + step * world + rank)
        policy.eval()
        batch = rollout(policy, reference, rm, chosen, enc, hp, rm_metrics.get("reward_offset", 0.0), device)
        sums = _all_sum([float(batch["scores"].mean()), float(batch["kl"].mean()), float(batch["entropy"]),
                         float(batch["mask"].sum(1).float().mean()), 1.0], device)
        metrics = {"step": float(step + 1), "reward_mean": sums[0] / sums[4], "kl": sums[1] / sums[4],
                   "entropy": sums[2] / sums[4], "response_tokens": sums[3] / sums[4]}
        # The KL bound: once the policy's rollouts are this far from the reference, stop before
        # another update (the same all-reduced value on every worker, so all stop together).
        stop = metrics["kl"] > hp.get("kl_bound", float("inf"))
        if not stop:
            policy.train()
            metrics.update(ppo_update(policy, optimizer, batch, hp, hp["seed"] + step, device))
        metrics.update(stopped_at_kl_bound=float(stop), step_seconds=time.perf_counter() - step_start)
        history.append(metrics)
        if rank == 0 and (stop or (step + 1) % hp["checkpoint_every"] == 0 or step + 1 == hp["ppo_steps"]):
            _save_atomic({"step": step + 1, "policy": unwrap(policy).state_dict(),
                          "optimizer": optimizer.state_dict(), "history": history, "stopped_at_kl_bound": stop},
                         checkpoint)
        report({**metrics, "phase": "ppo"})
        if stop:
            break
    _barrier()
    seconds = time.perf_counter() - started
    report({"phase": "ppo_done", "ppo_seconds": seconds}, phase_seconds={"ppo": seconds})
    if rank == 0:
        _save_policy(unwrap(policy).lm, base, run_dir / POLICY_DIR)
        value_head = {"value_head": unwrap(policy).value_head.state_dict()}
        _save_atomic(value_head, run_dir / "value_head.pt")
    _barrier()
    return history, seconds


def _save_policy(lm: nn.Module, base: Path, out: Path) -> None:
    """The child's float32 checkpoint with the parent's tokenizer, swapped in whole."""
    import shutil

    from model.hf_export import copy_tokenizer, save_checkpoint

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(lm, tmp)
    copy_tokenizer(base, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# ----------------------------------------------------------------- DPO
def answer_batch(items: Sequence[dict[str, Any]], enc: Encoder,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Like :func:`comparison_batch`, plus a mask that is 1 on each row's answer tokens; an answer the
    model did not end (the item's ``ended``) gets no end token (:meth:`Encoder.answer`)."""
    rows: list[list[int]] = []
    starts: list[int] = []
    groups: list[list[tuple[int, int]]] = []
    for item in items:
        prompt = enc.prompt(item["prompt"])
        offset = len(rows)
        ended = item.get("ended") or ()
        for i, a in enumerate(item["answers"]):
            rows.append(prompt + enc.answer(a, ended[i] if ended else True))
            starts.append(len(prompt))
        groups.append([(offset + b, offset + w) for b, w in item["pairs"]])
    ids, mask = pad(rows, enc.eos, left=False)
    answer = torch.zeros_like(mask)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        answer[i, start:len(row)] = 1
    return ids, mask, answer, groups


def _lm_logits(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits.float()


def _dpo_batch(policy: nn.Module, reference: nn.Module, items: Sequence[dict[str, Any]], enc: Encoder,
               hp: dict[str, Any], device: torch.device) -> dpo.DPOLoss:
    ids, mask, answer, groups = answer_batch(items, enc)
    ids, mask, answer = ids.to(device), mask.to(device), answer.to(device)
    simpo = hp.get("dpo_loss", "dpo") == "simpo"
    ref = None
    if not simpo:  # SimPO's reward has no reference term: no forward through the parent
        with torch.no_grad():
            ref = dpo.answer_logprobs(_lm_logits(reference, ids, mask), ids, answer)
    return dpo.dpo_loss(dpo.answer_logprobs(_lm_logits(policy, ids, mask), ids, answer), ref, groups,
                        hp["dpo_beta"], hp.get("dpo_nll", 0.0), answer[:, 1:].sum(-1),
                        hp.get("dpo_pairwise", 1.0), hp["simpo_gamma"] if simpo else None)


def evaluate_dpo(policy: nn.Module, reference: nn.Module, items: Sequence[dict[str, Any]], enc: Encoder,
                 hp: dict[str, Any], rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """The implicit reward's pair accuracy and loss on ``items`` (the held-out comparisons)."""
    policy.eval()
    correct = pairs = 0
    loss_sum = elements = 0.0
    mine = list(items)[rank::world]
    with torch.no_grad():
        for start in range(0, len(mine), hp["dpo_batch_size"]):
            chunk = mine[start:start + hp["dpo_batch_size"]]
            plain = {**hp, "dpo_nll": 0.0, "dpo_pairwise": 1.0}  # held-out loss: DPO's own, whatever trained
            result = _dpo_batch(unwrap(policy), reference, chunk, enc, plain, device)
            n = sum(1 for c in chunk if c["pairs"])
            correct += result.correct
            pairs += result.pairs
            loss_sum += result.loss.item() * n
            elements += n
    correct, pairs, loss_sum, elements = _all_sum([correct, pairs, loss_sum, elements], device)
    policy.train()
    return {"dpo_heldout_accuracy": correct / pairs if pairs else None,
            "dpo_heldout_loss": loss_sum / elements if elements else None, "dpo_heldout_pairs": int(pairs)}


def _quiz_check(lm: nn.Module, enc: Encoder, hp: dict[str, Any], step: int, parent: quiz.QuizCheck | None,
                rank: int, world: int, device: torch.device) -> quiz.QuizCheck:
    """The quality quiz on ``lm`` at ``step``, summed over the workers."""
    score, total = quiz.quiz_score(lm, enc.tokenizer, enc.eos, device, rank=rank, world=world)
    score, total = _all_sum([float(score), float(total)], device)
    return quiz.check(step, int(score), int(total), parent, hp["dpo_quiz_points"])


def _greedy_answers(lm: nn.Module, enc: Encoder, hp: dict[str, Any], asked: dict[str, list[str]],
                    rank: int, world: int, device: torch.device) -> list[str]:
    """Greedy answers of ``lm`` to this worker's share of ``asked["prompts"]`` (the validation or
    the anchor questions, in the served prompt layout)."""
    rows = [enc.prompt(p) for p in asked["prompts"][rank::world]]
    return quiz.greedy_texts(lm, enc.tokenizer, enc.eos, rows, device, 32, hp["eval_max_new_tokens"])


def anchor_items(parent: nn.Module, enc: Encoder, hp: dict[str, Any], anchor: dict[str, list[str]],
                 rank: int, world: int, device: torch.device) -> list[dict[str, Any]]:
    """This worker's share of the anchor prompts, each with the parent's greedy answer (what
    :func:`rlhf.dpo.anchor_kl` holds the policy to), in :func:`answer_batch`'s item shape."""
    answers = _greedy_answers(parent, enc, hp, anchor, rank, world, device)
    return [{"prompt": p, "answers": [a], "pairs": []}
            for p, a in zip(anchor["prompts"][rank::world], answers, strict=True)]


def _anchor_batch(policy: nn.Module, reference: nn.Module, items: Sequence[dict[str, Any]], enc: Encoder,
                  device: torch.device) -> torch.Tensor:
    """The anchor term on ``items``: KL from the reference's next-token distributions on its answers."""
    ids, mask, answer, _ = answer_batch(items, enc)
    ids, mask, answer = ids.to(device), mask.to(device), answer.to(device)
    with torch.no_grad():
        ref = _lm_logits(reference, ids, mask)
    return dpo.anchor_kl(_lm_logits(policy, ids, mask), ref, answer)


def _validation_check(lm: nn.Module, enc: Encoder, hp: dict[str, Any], step: int, asked: dict[str, list[str]],
                      parent_answers: list[str], rank: int, world: int,
                      device: torch.device) -> validation.ValidationCheck:
    """``lm``'s rule record against the parent on the validation questions, summed over the workers."""
    mine = validation.record(step, asked["questions"][rank::world], parent_answers,
                             _greedy_answers(lm, enc, hp, asked, rank, world, device))
    wins, ties, losses = _all_sum([float(mine.wins), float(mine.ties), float(mine.losses)], device)
    return validation.ValidationCheck(step, int(wins), int(ties), int(losses))


def _trainable_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}


class CheckpointMean:
    """The running mean of checkpoints' trainable weights (``RLHF_DPO_AVERAGE``), in float64 so
    that the order of the checkpoints does not change the mean's rounding."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self._sum: dict[str, torch.Tensor] = {}

    def add(self, step: int, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            total = self._sum.get(name)
            self._sum[name] = value.double() if total is None else total + value.double()
        self.steps.append(step)

    def mean(self) -> dict[str, torch.Tensor]:
        return {name: (total / len(self.steps)).float() for name, total in self._sum.items()}


def _average_check(lm: nn.Module, averaged: CheckpointMean, enc: Encoder, hp: dict[str, Any], step: int,
                   parent: quiz.QuizCheck, asked: dict[str, list[str]] | None, parent_answers: list[str],
                   rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Load the checkpoints' mean into ``lm`` and quiz it (and, with validation questions, score
    it); it stays loaded when it passes the quiz, otherwise ``lm`` gets its weights back."""
    before = _trainable_state(lm)
    lm.load_state_dict(averaged.mean(), strict=False)
    check = _quiz_check(lm, enc, hp, step, parent, rank, world, device)
    record: dict[str, Any] = {"of_steps": list(averaged.steps), "quiz": check.as_dict(), "kept": check.passed}
    if asked:
        record["validation"] = _validation_check(lm, enc, hp, step, asked, parent_answers, rank, world,
                                                 device).as_dict()
    if not check.passed:
        lm.load_state_dict(before, strict=False)
    return record


def extrapolated(parent: dict[str, torch.Tensor], kept: dict[str, torch.Tensor],
                 factor: float) -> dict[str, torch.Tensor]:
    """ExPO's weights: ``parent + factor x (kept - parent)`` for each of ``kept``'s tensors."""
    return {name: parent[name] + factor * (value - parent[name]) for name, value in kept.items()}


def _extrapolation_check(lm: nn.Module, reference: nn.Module, enc: Encoder, hp: dict[str, Any], step: int,
                         parent: quiz.QuizCheck, asked: dict[str, list[str]], parent_answers: list[str],
                         rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Score the kept weights and each extrapolation of them (``RLHF_DPO_EXTRAPOLATE``) on the validation
    questions and the quiz; load the best within the points (most wins, then fewest losses, then the
    smaller factor) into ``lm``. The kept weights (factor 1, ``step``'s) passed already, so they are not quizzed
    again; every record carries ``step``."""
    kept = _trainable_state(lm)
    start = {name: value.detach() for name, value in reference.named_parameters() if name in kept}
    record = _validation_check(lm, enc, hp, step, asked, parent_answers, rank, world, device)
    tried: list[dict[str, Any]] = [{"factor": 1.0, "validation": record.as_dict(), "passed": True}]
    best, best_key = 1.0, validation.preference(record)[:2]
    for factor in extrapolation_factors(hp["dpo_extrapolate"]):
        lm.load_state_dict(extrapolated(start, kept, factor), strict=False)
        check = _quiz_check(lm, enc, hp, step, parent, rank, world, device)
        record = _validation_check(lm, enc, hp, step, asked, parent_answers, rank, world, device)
        tried.append({"factor": factor, "quiz": check.as_dict(), "validation": record.as_dict(),
                      "passed": check.passed})
        if check.passed and validation.preference(record)[:2] > best_key:
            best, best_key = factor, validation.preference(record)[:2]
    lm.load_state_dict(kept if best == 1.0 else extrapolated(start, kept, best), strict=False)
    return {"tried": tried, "kept_factor": best}


def train_dpo(cfg: dict[str, Any], enc: Encoder, device: torch.device, rank: int, world: int,
              report: Any) -> tuple[list[dict[str, float]], dict[str, Any], float, dict[str, Any] | None]:
    """DPO on the training comparisons against the frozen parent; returns (history per step,
    held-out implicit-reward accuracy, seconds, quiz checks). A finished run's policy is kept on
    resume.

    With ``dpo_quiz_every`` N > 0 the quality quiz scores the parent, then the policy every N
    steps and after the last: the saved policy is the last checkpoint within ``dpo_quiz_points``
    of the parent's score (:func:`rlhf.quiz.kept_step`), so a run that moved too far falls back
    to where it still knew what its parent knew instead of failing the export's gate. With
    ``dpo_select`` "validation" (and ``cfg["validation"]``: questions and their served prompts) the
    same checkpoints also answer the validation questions, and the saved policy is the one among
    those within the points with most rule wins against the parent (:func:`rlhf.validation.best_step`).
    With ``dpo_average`` the mean of every checked checkpoint's weights is quizzed (and scored) after
    the last step and saved instead when it is within the points (:class:`CheckpointMean`). With
    ``dpo_extrapolate`` (and validation questions) the kept weights are then extrapolated away from the
    parent by each factor and the best on validation within the points is saved (:func:`extrapolated`).
    """
    from ray.train.torch import prepare_model

    run_dir = Path(cfg["run_dir"])
    hp = cfg["hp"]
    base = Path(cfg["base_hf_dir"])
    done = run_dir / "dpo.json"
    if done.is_file() and (run_dir / DPO_POLICY_DIR / "model.safetensors").is_file():
        saved = json.loads(done.read_text(encoding="utf-8"))
        report({"phase": "dpo_done", "resumed": 1.0})
        return saved["history"], saved["heldout"], saved["seconds"], saved.get("quiz")
    started = time.perf_counter()
    policy = load_lm(base)
    reference = load_lm(base).to(device).eval()
    reference.requires_grad_(False)
    train_only_top_layers(policy.model, hp.get("train_layers", 0))
    policy = prepare_model(policy)
    optimizer = torch.optim.AdamW(trainable(policy), lr=hp["dpo_lr"])
    train = cfg["train"]
    every = hp.get("dpo_quiz_every", 0)
    parent = _quiz_check(reference, enc, hp, 0, None, rank, world, device) if every else None
    checks: list[quiz.QuizCheck] = []
    asked = cfg.get("validation") if every and hp.get("dpo_select") == "validation" else None
    parent_answers = _greedy_answers(reference, enc, hp, asked, rank, world, device) if asked else []
    anchored = (anchor_items(reference, enc, hp, cfg["anchor"], rank, world, device)
                if hp.get("dpo_anchor", 0.0) > 0 else [])
    anchor_order = [i for epoch in range(hp["dpo_epochs"] + 1)
                    for i in torch.randperm(len(anchored), generator=torch.Generator().manual_seed(
                        hp["seed"] + 2000 + epoch)).tolist()]
    scored: list[validation.ValidationCheck] = []
    best: tuple[int, int, int] | None = None  # validation.preference of the kept state
    passed_state: dict[str, torch.Tensor] | None = None
    averaged = CheckpointMean() if parent is not None and hp.get("dpo_average") else None
    history: list[dict[str, float]] = []
    step = 0
    batches = [(epoch, batch) for epoch in range(hp["dpo_epochs"])
               for batch in shard_batches(len(train), hp["dpo_batch_size"], rank, world, hp["seed"] + 1000 + epoch)]
    for epoch, batch in batches:
        step_start = time.perf_counter()
        result = _dpo_batch(policy, reference, [train[i] for i in batch], enc, hp, device)
        loss, anchor_kl = result.loss, 0.0
        if anchored:  # the next dpo_batch_size anchor answers, cycling through a shuffled order
            picked = [anchored[anchor_order[(step * hp["dpo_batch_size"] + k) % len(anchor_order)]]
                      for k in range(hp["dpo_batch_size"])]
            kl = _anchor_batch(policy, reference, picked, enc, device)
            loss, anchor_kl = loss + hp["dpo_anchor"] * kl, float(kl.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(policy), hp["max_grad_norm"])
        optimizer.step()
        sums = _all_sum([result.loss.item(), float(result.correct), float(result.pairs), result.margin,
                         result.chosen_reward, result.rejected_reward, 1.0, result.nll, anchor_kl], device)
        step += 1
        metrics = {"step": float(step), "epoch": float(epoch + 1), "dpo_loss": sums[0] / sums[6],
                   "dpo_accuracy": sums[1] / sums[2] if sums[2] else 0.0, "dpo_margin": sums[3] / sums[6],
                   "dpo_chosen_reward": sums[4] / sums[6], "dpo_rejected_reward": sums[5] / sums[6],
                   "dpo_nll": sums[7] / sums[6], "dpo_anchor_kl": sums[8] / sums[6],
                   "step_seconds": time.perf_counter() - step_start}
        history.append(metrics)
        report({**metrics, "phase": "dpo"})
        if parent is not None and (step % every == 0 or step == len(batches)):
            checks.append(_quiz_check(unwrap(policy), enc, hp, step, parent, rank, world, device))
            if averaged is not None:
                averaged.add(step, _trainable_state(unwrap(policy)))
            report({"phase": "dpo_quiz", "step": float(step), "quiz_pct": checks[-1].pct})
            if asked:
                scored.append(_validation_check(unwrap(policy), enc, hp, step, asked, parent_answers,
                                                rank, world, device))
                report({"phase": "dpo_validation", "step": float(step), "validation_wins": scored[-1].wins,
                        "validation_losses": scored[-1].losses})
            if checks[-1].passed:
                rank_key = validation.preference(scored[-1]) if asked else None
                if rank_key is None or best is None or rank_key > best:
                    passed_state, best = _trainable_state(unwrap(policy)), rank_key
    quiz_record = None
    if parent is not None:
        kept = (validation.best_step([c.step for c in checks if c.passed], scored) if asked
                else quiz.kept_step(checks))
        if kept is not None and kept != step and passed_state is not None:
            unwrap(policy).load_state_dict(passed_state, strict=False)  # the kept checkpoint's weights
        quiz_record = {"parent": parent.as_dict(), "checks": [c.as_dict() for c in checks], "kept_step": kept,
                       "points": hp["dpo_quiz_points"], "select": "validation" if asked else "quiz"}
        if asked:
            quiz_record["validation"] = {"questions": len(asked["questions"]),
                                         "checks": [c.as_dict() for c in scored]}
        if averaged is not None and len(averaged.steps) > 1:
            quiz_record["average"] = _average_check(unwrap(policy), averaged, enc, hp, step, parent, asked,
                                                    parent_answers, rank, world, device)
            if quiz_record["average"]["kept"]:  # the mean's history is the whole run's
                quiz_record["average"]["instead_of"], quiz_record["kept_step"] = kept, step
        if asked and hp.get("dpo_extrapolate") and kept is not None:
            quiz_record["extrapolation"] = _extrapolation_check(unwrap(policy), reference, enc, hp,
                                                                quiz_record["kept_step"], parent, asked,
                                                                parent_answers, rank, world, device)
    heldout = evaluate_dpo(policy, reference, cfg["held_out"], enc, hp, rank, world, device)
    seconds = time.perf_counter() - started
    report({**heldout, "phase": "dpo_done", "dpo_seconds": seconds}, phase_seconds={"dpo": seconds})
    if rank == 0:
        _save_policy(unwrap(policy), base, run_dir / DPO_POLICY_DIR)
        done.write_text(json.dumps({"history": history, "heldout": heldout, "seconds": seconds,
                                    "quiz": quiz_record}) + "\n", encoding="utf-8")
    _barrier()
    return history, heldout, seconds, quiz_record


# ----------------------------------------------------------------- entry point
def algorithms(name: str) -> tuple[str, ...]:
    """The policy trainers an ``RLHF_ALGORITHM`` value runs, in order."""
    return ("ppo", "dpo") if name == "both" else (name,)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train's per-worker function: reward model, then PPO; rank 0 writes the results."""
    import ray.train
    from ray.train.torch import get_device

    from rlhf.metrics import JobMetrics

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg["hp"]["cpus_per_worker"])))
    torch.manual_seed(cfg["hp"]["seed"] + rank)
    device = get_device()
    gauges = JobMetrics(cfg.get("pushgateway_url", "")) if rank == 0 else None

    def report(metrics: dict[str, Any], phase_seconds: dict[str, float] | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if gauges is not None:
            gauges.update(numeric, phase_seconds)
        ray.train.report({**numeric, "phase": metrics.get("phase", "")})

    hp = cfg["hp"]
    enc = Encoder(Path(cfg["base_hf_dir"]) / "tokenizer.json", hp["max_prompt_tokens"], hp["max_answer_tokens"])
    rm, rm_metrics = train_reward_model(cfg, enc, device, rank, world, report)
    metrics: dict[str, Any] = {"reward_model": rm_metrics, "ppo": [], "dpo": [], "dpo_heldout": None, "dpo_quiz": None,
                               "phase_seconds": {"reward_model": rm_metrics.get("reward_model_seconds", 0.0)}}
    chosen = algorithms(hp.get("algorithm", "ppo"))
    if "ppo" in chosen:
        metrics["ppo"], metrics["phase_seconds"]["ppo"] = train_ppo(cfg, rm, rm_metrics, enc, device, rank, world,
                                                                    report)
    if "dpo" in chosen:
        del rm  # DPO needs no reward model: free its memory first
        metrics["dpo"], metrics["dpo_heldout"], metrics["phase_seconds"]["dpo"], metrics["dpo_quiz"] = train_dpo(
            cfg, enc, device, rank, world, report)
    if rank == 0:
        (Path(cfg["run_dir"]) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    _barrier()
