"""The data of a run: the dataset ledger, the call cache, and Hugging Face imagefolder import/export."""

from .cache import CachedGenerator, CachedJudge, Call, CallBudget
from .imagefolder import export_imagefolder, import_imagefolder
from .ledger import Ledger, Op, Record

__all__ = [
    "CachedGenerator",
    "CachedJudge",
    "Call",
    "CallBudget",
    "Ledger",
    "Op",
    "Record",
    "export_imagefolder",
    "import_imagefolder",
]
