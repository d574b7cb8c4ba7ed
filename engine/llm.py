"""The in-process engine API, shaped like vLLM's:

    from engine import LLM, SamplingParams
    llm = LLM()                                   # the default model, bf16, on the CPU (device="cuda": a GPU)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text, outs[0].token_ids)

Every prompt given to one `generate` call is scheduled together with
continuous batching (packed prefill, then batched decode steps).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import torch

from engine.chunked_scheduler import ChunkedScheduler
from engine.errors import ConfigError, InvalidRequestError
from engine.instance import build_engine
from engine.validation import validate_request
from engine.output import RequestOutput, StopChecker
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, SeqState
from engine.tokenizer import load_tokenizer

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "bfloat16",
                 block_size: int = 16, kv_cache_memory_gb: float = 1.0, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 num_threads: int | None = None, seed: int = 0, enable_chunked_prefill: bool = False,
                 enable_prefix_caching: bool = False, device: str = "cpu") -> None:
        """`enable_chunked_prefill`: prompts run in chunks that share each step's
        `max_num_batched_tokens` with the running decodes (Sarathi-Serve).
        `enable_prefix_caching`: a prompt whose prefix another request computed reuses its KV.
        `device`: cpu, cuda or cuda:N, where the weights, the KV cache and sampling live (engine/device.py)."""
        parts = build_engine(model, dtype, block_size, kv_cache_memory_gb, max_model_len, num_threads, seed,
                             enable_prefix_caching=enable_prefix_caching, device=device)
        self.model_config = cfg = parts.model_config
        self.runner, self.block_manager = parts.runner, parts.blocks
        self.dtype, self.max_model_len = parts.runner.dtype, parts.max_model_len
        self.tokenizer = load_tokenizer(cfg.path)
        sched_cfg = SchedulerConfig(max_num_seqs, max_num_batched_tokens, self.max_model_len)
        if enable_chunked_prefill:
            if max_num_batched_tokens < max_num_seqs:
                raise ConfigError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                                  f"({max_num_seqs}) with chunked prefill")
            self.scheduler = ChunkedScheduler(sched_cfg, self.block_manager, cfg.eos_token_ids)
        else:
            self.scheduler = Scheduler(sched_cfg, self.block_manager, cfg.eos_token_ids)
        self._ids = itertools.count()
        self._stop_checkers: dict[str, StopChecker] = {}

    # -- public API ------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = [self._make_request(p, sp) for p, sp in zip(prompts, params)]  # validate all first
        for seq in seqs:
            self.scheduler.add(seq)
            if seq.sampling.stop and self.tokenizer is not None:
                self._stop_checkers[seq.req_id] = StopChecker(self.tokenizer, seq.sampling.stop)
        outputs = self._run(seqs, use_tqdm)
        for prompt, seq in zip(prompts, seqs):
            outputs[seq.req_id].prompt = prompt if isinstance(prompt, str) else None
        return [outputs[seq.req_id] for seq in seqs]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.apply_chat_template(c) for c in conversations], sampling_params)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- internals ----------------------------------------------------------------
    def _make_request(self, prompt: Prompt, params: SamplingParams) -> SeqState:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        validate_request(ids, params, self.model_config.vocab_size, self.max_model_len,
                         self.block_manager.num_blocks, self.block_manager.block_size)
        return SeqState(f"llm-{next(self._ids)}", ids, params, arrival_time=time.monotonic())

    def _run(self, seqs: list[SeqState], use_tqdm: bool) -> dict[str, RequestOutput]:
        texts: dict[str, str] = {}
        pending = {s.req_id: s for s in seqs}
        bar = _progress(len(seqs)) if use_tqdm else None
        done: dict[str, RequestOutput] = {}
        try:
            while self.scheduler.has_unfinished():
                plan = self.scheduler.schedule(time.monotonic())
                if plan is None:
                    raise RuntimeError("scheduler has unfinished requests but nothing to run")
                result = self.runner.execute(plan)
                self.scheduler.update(plan, result)
                now = time.monotonic()
                for work in plan.seqs:
                    seq = pending.get(work.req_id)
                    if seq is None:
                        continue
                    if seq.first_token_time is None and seq.output_token_ids:   # a chunk may sample nothing
                        seq.first_token_time = now
                    self._check_stop(seq, texts)
                    if seq.is_finished:
                        done[seq.req_id] = self._output(seq, texts.get(seq.req_id), now)
                        del pending[seq.req_id]
                        if bar is not None:
                            bar.update(1)
        finally:
            for req_id in pending:   # interrupted: free whatever is still held
                self.scheduler.abort(req_id)
                self._stop_checkers.pop(req_id, None)
            if bar is not None:
                bar.close()
        return done

    def _check_stop(self, seq: SeqState, texts: dict[str, str]) -> None:
        checker = self._stop_checkers.get(seq.req_id)
        if checker is None:
            return
        cut = checker.check(seq.output_token_ids)
        if cut is not None:
            texts[seq.req_id] = cut
            if not seq.is_finished:
                self.scheduler.finish(seq.req_id, FinishReason.STOP)
            else:
                seq.finish_reason = FinishReason.STOP
        if seq.is_finished:
            del self._stop_checkers[seq.req_id]

    def _output(self, seq: SeqState, text: str | None, now: float) -> RequestOutput:
        if text is None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True) if self.tokenizer else ""
        n = len(seq.output_token_ids)
        first = seq.first_token_time if seq.first_token_time is not None else now
        metrics = {"ttft_s": first - seq.arrival_time, "e2e_s": now - seq.arrival_time,
                   "tpot_s": (now - first) / (n - 1) if n > 1 else 0.0,
                   "num_preemptions": float(seq.num_preemptions)}
        return RequestOutput(seq.req_id, None, seq.prompt_token_ids, list(seq.output_token_ids),
                             text, seq.finish_reason.value, metrics)


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="generate", unit="req")
