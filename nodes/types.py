"""The socket types MoLE's nodes pass between them (upper snake case, as ComfyUI's own)."""
from comfy_api.latest import io

Experts = io.Custom("MOLE_EXPERTS")      # tuple of ExpertFile, in column order
Gates = io.Custom("MOLE_GATES")          # a GateFile
Trace = io.Custom("MOLE_TRACE")          # a GateTrace, or None when record_trace is off
Settings = io.Custom("MOLE_SETTINGS")    # a card.Recommended (a pack's recommended settings), or None
Ensemble = io.Custom("EMOE_ENSEMBLE")    # ModelEnsemble or ExpertEnsemble (nodes/uncertainty.py)
Estimate = io.Custom("EMOE_ESTIMATE")    # an EarlyEstimate (nodes/patch.py)
