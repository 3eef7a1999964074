from .. import require_fairseq

require_fairseq("fairseq_longmem.models")

# every family's models: gpt2_lm, longmem_gpt2, llama_lm, longmem_llama and their archs
from ..families.gpt2 import model as _gpt2  # noqa: E402,F401
from ..families.llama import model as _llama  # noqa: E402,F401
