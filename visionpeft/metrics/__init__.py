"""Metrics: ``segmentation`` (mIoU / aAcc / mAcc from one dataset-wide confusion matrix; imports nothing of
visionpeft but ``errors``) and ``clip_scores`` (CLIP-T / CLIP-I / DINO similarity for generated images)."""
