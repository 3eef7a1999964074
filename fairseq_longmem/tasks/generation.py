"""Generation with ``--task longmem_lm`` through fairseq's own ``SequenceGenerator``: each prompt
is fed segment by segment into memory and the local window once (:class:`PromptedEnsemble`),
then fairseq's beam search or sampling continues it one token at a time (docs/GENERATION.md).

Also the prompt-memory files of ``fairseq-interactive`` (``--memory-file``, ``--save-memory``):
the memory bank's safetensors format with an identity of what it was built with.
"""

import copy
import hashlib
import json
import logging
import math
import os
from typing import Callable, Optional

import numpy as np
import torch
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator

from ..memory.bank import ChunkedMemoryBank
from ..memory.file_format import read_identity
from .scoring import memory_scoring

logger = logging.getLogger(__name__)

PROMPT_MEMORY_KIND = "fairseq_longmem.prompt_memory/1"
# what a prompt memory must share with the model that reads it (the rest describes its text)
MATCHING_KEYS = ("kind", "backbone", "dtype", "memory_layer", "chunk_size", "memory_size",
                 "segment_tokens")


class PromptedEnsemble(EnsembleModel):
    """fairseq's ``EnsembleModel`` for one ``longmem_gpt2`` model whose hypotheses continue
    prompts. ``forward_encoder`` (called once per batch) feeds ``</s>`` + each prompt through
    :meth:`LongMemDecoder.prefill`; the first ``forward_decoder`` call installs that state, one
    copy per beam (:meth:`DecodingState.expand`), in fairseq's incremental state and returns the
    prefill's last log-probabilities; later calls feed the last generated token.

    With ``stop_at_eos`` False, ``</s>`` (a line end in our corpora) is an ordinary token and the
    generator's end-of-hypothesis symbol is ``<s>``, allowed only at the last step (log-prob 0),
    so hypotheses run to the maximum length.
    """

    def __init__(self, models, segment_len: int, stop_at_eos: bool,
                 start_memory: Optional[Callable[[int, torch.Tensor], ChunkedMemoryBank]] = None,
                 save_memory: Optional[Callable] = None):
        super().__init__(models)
        decoder = self.single_model.decoder
        self.segment_len = segment_len
        self.stop_at_eos = stop_at_eos
        self.start_memory = start_memory
        self.save_memory = save_memory
        self.bos, self.eos = decoder.dictionary.bos(), decoder.dictionary.eos()
        self.beam = 1
        self.max_len = None  # set by the generator for each batch
        self._prefilled = None

    def set_decoder_beam_size(self, beam_size):
        self.beam = beam_size

    @property
    def decoder(self):
        return self.single_model.decoder

    def has_incremental_states(self):
        return True

    def max_decoder_positions(self):
        return 2**62  # segments restart the positions: no limit on the length

    def forward_encoder(self, net_input):
        prompts = net_input["src_tokens"]  # (B, n), every row n tokens (the task batches so)
        template = next(self.single_model.parameters())  # device and dtype of the state
        B = prompts.size(0)
        eos = prompts.new_full((B, 1), self.eos)
        memory = self.start_memory(B, template) if self.start_memory is not None else None
        state = self.decoder.start_decoding(B, template, memory=memory,
                                            segment_len=self.segment_len)
        logits = self.decoder.prefill(torch.cat([eos, prompts], dim=1), state)  # (B, V)
        if self.save_memory is not None:
            self.save_memory(self.decoder, state, prompts)
        self._prefilled = (state, logits)
        return None

    def shares_prompt_memory(self, state) -> bool:
        """Beams share their prompt's memory when that is exact (decoding_state.py): nothing is
        staged, segments end on chunk boundaries and nothing can be evicted; and the model
        searches each memory layer itself (not --search-every > 1)."""
        memory = state.memory
        if self.beam == 1 or memory is None:
            return False
        side = getattr(self.decoder, "sidenet", None)
        if side is not None and side.search_every > 1 and len(side.read_layers) > 1:
            return False  # a shared search gathers by bank slot; a shared prompt has none
        written = state.pos + self.max_len + 1  # tokens that may reach the memory
        return (int(memory.staged().sum()) == 0
                and self.segment_len % memory.chunk_size == 0
                and int(memory.fill().max()) + written <= memory.memory_size)

    def _install(self, incremental_state):
        state, logits = self._prefilled
        self._prefilled = None
        dec = self.decoder
        generated = memory_scoring.memory_size_for(
            state.pos + self.max_len + 1, dec.cfg.chunk_size, dec.cfg.retrieved_tokens)
        state.expand(self.beam, lambda rows: dec.new_memory(rows, generated, logits),
                     self.shares_prompt_memory(state))
        dec.set_decoding_state(incremental_state, state)
        return logits.repeat_interleave(self.beam, dim=0)  # (B * beam, V)

    def forward_decoder(self, tokens, encoder_outs, incremental_states, temperature=1.0):
        state = self.decoder.decoding_state(incremental_states[0])
        if state is None:
            logits = self._install(incremental_states[0])
        else:
            logits = self.decoder.advance(tokens[:, -1:], state)[:, -1]  # (N, V)
        lprobs = self.single_model.get_normalized_probs(
            (logits.div(temperature)[:, None], None), log_probs=True)[:, -1]  # (N, V)
        if not self.stop_at_eos:
            step = tokens.size(1) - 1
            lprobs[:, self.bos] = 0.0 if step >= self.max_len else -math.inf
        return lprobs, None


class HypothesisNGramBlock(torch.nn.Module):
    """fairseq 0.12's CPU ``--no-repeat-ngram-size`` reads the last n-1 entries of the whole
    token buffer, which is padding, instead of the hypothesis so far, so it blocks nothing;
    this hands it the hypotheses so far (``tokens[:, :step + 1]``)."""

    def __init__(self, blocker):
        super().__init__()
        self.blocker = blocker

    def forward(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        return self.blocker(tokens[:, :step + 1], lprobs, bsz, beam_size, step)


class LongMemSequenceGenerator(SequenceGenerator):
    """fairseq's ``SequenceGenerator`` over a :class:`PromptedEnsemble`: fairseq's own beam
    search, sampling, length and n-gram options; hypotheses are as long as ``--max-len-b``
    (plus ``--max-len-a`` times the prompt length) unless ``stop_at_eos``."""

    def __init__(self, models, tgt_dict, segment_len: int, stop_at_eos: bool,
                 start_memory=None, save_memory=None, **kwargs):
        ensemble = PromptedEnsemble(models, segment_len, stop_at_eos, start_memory, save_memory)
        eos = tgt_dict.eos() if stop_at_eos else tgt_dict.bos()
        super().__init__(ensemble, tgt_dict, eos=eos, **kwargs)
        blocker = self.repeat_ngram_blocker
        if blocker is not None and not blocker.use_extension:
            self.repeat_ngram_blocker = HypothesisNGramBlock(blocker)

    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        src_len = sample["net_input"]["src_tokens"].size(1)
        self.model.max_len = min(int(self.max_len_a * src_len + self.max_len_b),
                                 self.max_len - 1)
        return super()._generate(sample, prefix_tokens, constraints, bos_token)


# ---------------------------------------------------------------------------------- memory files


def prompt_memory_identity(decoder, segment_len: int, tokens: Optional[torch.Tensor] = None
                           ) -> dict:
    """What a prompt memory's content depends on; saved in its header, compared on loading."""
    identity = {
        "kind": PROMPT_MEMORY_KIND,
        "backbone": memory_scoring.backbone_digest(decoder.backbone),
        "dtype": str(next(decoder.parameters()).dtype).replace("torch.", ""),
        "memory_layer": decoder.memory_label,
        "chunk_size": decoder.cfg.chunk_size,
        "memory_size": decoder.cfg.memory_size,
        "segment_tokens": segment_len,
    }
    if tokens is not None:
        identity["tokens"] = hashlib.sha256(
            tokens.cpu().numpy().astype(np.int64).tobytes()).hexdigest()[:16]
        identity["num_tokens"] = int(tokens.numel())
    return identity


def load_prompt_memory(path: str, decoder, segment_len: int, template) -> ChunkedMemoryBank:
    """A one-row memory read from ``--memory-file`` (on ``template``'s device, in its dtype),
    refused in one line when it is not a prompt memory of this model (another backbone, memory
    layer, chunk or memory size, segment)."""
    try:
        identity = read_identity(path, PROMPT_MEMORY_KIND)
    except ValueError as e:
        raise ValueError(f"--memory-file {path} is not a prompt memory of fairseq-longmem "
                         f"({e}): write one with fairseq-interactive --save-memory") from None
    want = prompt_memory_identity(decoder, segment_len)
    diff = ", ".join(f"{k} (file {identity.get(k)!r}, this model {want[k]!r})"
                     for k in MATCHING_KEYS if identity.get(k) != want[k])
    if diff:
        raise ValueError(f"--memory-file {path} was written by another model or setting; it "
                         f"differs in: {diff}. Write it again with this model (--save-memory)")
    memory = decoder.new_memory(1, decoder.cfg.memory_size, template)
    memory.load(path)
    logger.info("memory: %d tokens (%d searchable) loaded from %s", identity.get("num_tokens", -1),
                int(memory.fill()[0]), path)
    return memory


def save_prompt_memory(path: str, decoder, state, prompt: torch.Tensor, row: int = 0):
    """Write row ``row``'s memory after its prompt, the prompt's last partial segment included
    (as eval-lm writes a document's last segment), to a new file ``path``."""
    memory = copy.copy(state.memory).select_rows([row])  # a copy: decoding goes on unchanged
    if state.pos:
        memory.add(*decoder.memory_from_caches(state.backbone, slice(row, row + 1), state.pos))
    identity = prompt_memory_identity(decoder, state.segment_len, prompt)
    memory.fingerprint = json.dumps(identity, sort_keys=True)
    memory.save(path)  # refuses an existing file
    logger.info("memory of the prompt (%d tokens, %d searchable) saved to %s",
                identity["num_tokens"], int(memory.fill()[0]), path)


def check_new_file(path: str, option: str):
    if os.path.exists(path):
        raise ValueError(f"{option} {path} exists: memory files are never overwritten; pass a "
                         "new path")
