"""Pure torch pieces of the pack (maps, token alignment, attention edits).

Only `router.py` touches ComfyUI; every other module here imports torch / numpy / einops only.
"""
