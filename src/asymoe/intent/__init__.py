"""Multimodal intent recognition (`task: intent`): our reading of A-MESS on the asymoe framework.

Only the A-MESS abstract is public; everything here is our reading of it: learnable anchors that
cross-attend over the video and audio feature sequences and are written into reserved slots of a
text encoder's input (anchor-based multimodal embedding), and a semantic-synchronisation loss that
pulls the fused sample embedding towards the encoded description of its intent label.

This package imports nothing heavy at the top level: the config schema imports `intent.config`.
"""
