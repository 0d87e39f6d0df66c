"""The data of a run: the dataset ledger, the call cache, and Hugging Face imagefolder import/export."""

from .budgets import CallBudgets
from .cache import Call, CallBudget
from .cached import CachedGenerator, CachedJudge
from .claim import check_run_folder, claim_run_folder, describe_owner, folder_owner, release_run_folder
from .imagefolder import export_imagefolder, import_imagefolder
from .ledger import Ledger, Op, Record

__all__ = [
    "CachedGenerator",
    "CachedJudge",
    "Call",
    "CallBudget",
    "CallBudgets",
    "Ledger",
    "Op",
    "Record",
    "check_run_folder",
    "describe_owner",
    "folder_owner",
    "claim_run_folder",
    "export_imagefolder",
    "import_imagefolder",
    "release_run_folder",
]
