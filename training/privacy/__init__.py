"""training.privacy: privacy of fastmix's defences under attack (issue 5).

    data        victim / attacker / judge identity-disjoint splits (ORL, LFW, folder:PATH)
    attacks     protected representations, the attacker's pseudo-inverse, the U-Net decoder (S1 / S2),
                the deployed model
    inversion   white-box (S3) and black-box (S4) model inversion over the attacker's face prior
    stream      S5, the training server's attack on the protected training stream
    judge       the judges: pretrained on other people, victims enrolled by templates
    metrics     PSNR / SSIM (scikit-image), Score_pp / Score_cls
    stats       per-victim success, bootstrap intervals over seeds x victims
    run         every scenario against every defence of training/ for one split and seed
    report      table (markdown + JSON), frontier plot, image grid, HTML, the claim test
    __main__    ``python -m training.privacy``

Threat model and score definitions: THREAT_MODEL.md. Masking goes through fastmix and training.defences only.
"""
