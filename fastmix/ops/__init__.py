"""Op families, one per file: dct (block DCT and layouts), freq_mix (the fused hybrid mask),
frontend (the fused frequency front-end), sign (the sign-flip key), noise (the seeded noise draw)."""


def register_all() -> None:
    """Fake (meta) and autograd registrations of the C++ ops; called once fastmix._C has loaded."""
    from . import dct, freq_mix

    dct.register_ops()
    freq_mix.register_ops()
