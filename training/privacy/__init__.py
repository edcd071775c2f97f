"""training.privacy: privacy of fastmix's defences under attack (issue 5).

    data        victim / attacker identity-disjoint splits (ORL, LFW)
    attacks     protected representations, the attacker's pseudo-inverse, the U-Net decoder (S1 / S2),
                white-box MI-Face (S3) and black-box NES (S4) model inversion
    evaluator   the independent clean FR model that judges identity leak
    metrics     PSNR / SSIM (scikit-image), identity leak, model-inversion accuracy, Score_pp / Score_cls
    run         every scenario against every defence of training/ for one split and seed
    report      table (markdown + JSON), frontier plot, image grid, HTML, the claim test
    __main__    ``python -m training.privacy``

Threat model and score definitions: THREAT_MODEL.md. Masking goes through fastmix and training.defences only.
"""
