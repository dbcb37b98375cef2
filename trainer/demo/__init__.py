"""The demo: the whole pipeline in a synthetic human-centric world on this machine (`python -m trainer demo`).

pipeline (the steps and their caching), world (the drawn scenes, close-ups and masks), vae (a TAESD trained on
the world), evidence (what is measured on held-out pictures), report (the markdown report).
"""
