"""Metrics: ``segmentation`` (mIoU / aAcc / mAcc from one dataset-wide confusion matrix; imports nothing of
visionpeft but ``errors``), ``clip_scores`` (CLIP-T / CLIP-I / DINO similarity for generated images) and
``base_to_new`` (the harmonic mean of base and new accuracy)."""
