"""kne: fast KNE (Knowledge Neuronal Ensemble) knowledge editing for Hugging Face models.

>>> import kne
>>> model, tok = kne.load_model()                       # embedded SmolLM2-135M-Instruct, offline
>>> res = kne.fast_edit(model, tok, {"prompt": "The capital of France is", "target_new": "Rome"})
>>> kne.evaluate(model, tok, res.requests)              # EasyEdit's metrics
>>> res.restore()                                       # every weight back, bit for bit
"""

from .adapters import register_architecture, supported_model_types
from .attribution import Attribution, attribute, locate
from .config import KNEConfig
from .editing import EditError, EditResult, fast_edit
from .editfile import apply_edit, read_edit, revert_edit
from .ensemble import Ensemble
from .evaluation import EvalResult, evaluate
from .models import load_model
from .requests import EditRequest, load_knowedit
from . import baselines, datasets, plots, reference

__version__ = "0.2.0"

__all__ = [
    "apply_edit", "read_edit", "revert_edit", "Attribution", "EditError", "EditRequest", "EditResult", "Ensemble", "EvalResult", "KNEConfig",
    "attribute", "baselines", "datasets", "evaluate", "plots", "fast_edit", "load_knowedit", "load_model", "locate", "reference",
    "register_architecture", "supported_model_types", "__version__",
]
