"""A plain language model over a backbone of any family (``gpt2_lm``, ``llama_lm``): trained from
scratch, evaluated, or written by the converter (``python -m fairseq_longmem.convert``); the
frozen backbone of LongMem. Each family registers its own subclass with its sizes' options."""

from fairseq.models import FairseqLanguageModel

from ..families import FAMILIES
from .common import BackboneDecoder, bind_dictionary, check_segment_length, check_vocab


class BackboneLMDecoder(BackboneDecoder):
    def forward(self, src_tokens, features_only: bool = False, **unused):
        last = len(self.backbone.blocks)
        hiddens, _ = self.backbone(src_tokens, keep=(last,))  # the others freed as it goes
        x = self.backbone.final_norm(hiddens[last])  # (B, T, C)
        return (x if features_only else self.output_layer(x)), {"inner_states": [hiddens[last]]}


class BackboneLanguageModel(FairseqLanguageModel):
    """Subclasses set ``family`` (a name in FAMILIES) and ``dims_from_config(cfg, vocab)``."""

    family = ""

    @staticmethod
    def dims_from_config(cfg, vocab_size: int):
        raise NotImplementedError

    @classmethod
    def build_model(cls, cfg, task):
        family = FAMILIES[cls.family]
        check_segment_length(cfg.max_target_positions, cfg.max_positions,
                             "the model's --max-positions,")
        bind_dictionary(cfg, task, f"the {family.lm_model} checkpoint")
        dictionary = task.target_dictionary
        backbone = family.backbone(cls.dims_from_config(cfg, len(dictionary)))
        return cls(BackboneLMDecoder(dictionary, backbone, cfg.mask_special_logits))

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        key = "decoder.backbone." + self.decoder.backbone.token_embedding
        check_vocab(state_dict, key, self.decoder.dictionary, "checkpoint")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
