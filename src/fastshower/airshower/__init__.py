"""Air-shower profiles (geometry ``airshower-profile``): their models' configs, training data, generation and scores.

The reference generator (the CONEX-like hybrid on SIBYLL-2.3d) is :mod:`fastshower.montecarlo.airshower`;
this package holds what sits around the generic registry and fit loop for profiles:

- :data:`PROFILE_CONFIGS`: training configs of the KIT design (a conditional WGAN-GP on
  log energy, zenith, azimuth and the primary, ln A) and of conditional flow matching, for
  :func:`fastshower.training.train`.
- :func:`prepare_training_file`: merge the files of several primaries into one training file
  (:func:`fastshower.io.merge_files`, ``add_condition="primary"``, ln A per input) with the
  below-ground bins continued smoothly (:func:`fill_below_ground`); generation zeroes them again
  (:func:`fastshower.sampling.zero_below_ground`), which inverts the fill exactly. Without the fill the
  zenith-dependent ground makes the bins between 1036 and ~2450 g/cm^2 bimodal in model space and
  the WGAN-GP made spikes there (Xmax separation power 0.076, with the fill 0.027, floor 0.024; see
  benchmarks/results/airshower_models*.json).
- :func:`gaisser_hillas_profiles` / :func:`write_synthetic_profiles`: realistic synthetic
  profiles (Gaisser-Hillas shapes with shower-to-shower and bin-to-bin fluctuations, zero
  below ground) for tests and for the large-file streaming benchmark; not a physics reference.
- :func:`mirror_generate`: generate one model profile for every reference profile, with the
  same energy, zenith, azimuth and primary, so that the two files compare bin by bin.
- :func:`xmax_moments` / :func:`compare_xmax_moments`: <Xmax> and RMS(Xmax) per primary and
  energy bin, the quantities composition analyses are built on.
- :func:`physicality`: checks that generated profiles are non-negative, finite and exactly
  zero below ground; :func:`profile_roughness`: bin-to-bin noise of dE/dX.

Units: energies in MeV in files (eV where the name says so), slant depths in g/cm^2, dE/dX in
MeV/(g/cm^2), Ne a number of charged particles, angles in degrees.
"""

from __future__ import annotations

from fastshower.airshower.configs import PROFILE_CONFIGS
from fastshower.airshower.metrics import compare_xmax_moments, physicality, profile_roughness, xmax_moments
from fastshower.airshower.mirror import mirror_generate
from fastshower.airshower.profiles import (
    FILL_DECAY_LENGTH,
    fill_below_ground,
    gaisser_hillas_profiles,
    prepare_training_file,
    write_synthetic_profiles,
)

__all__ = [
    "FILL_DECAY_LENGTH",
    "PROFILE_CONFIGS",
    "compare_xmax_moments",
    "fill_below_ground",
    "gaisser_hillas_profiles",
    "mirror_generate",
    "physicality",
    "prepare_training_file",
    "profile_roughness",
    "write_synthetic_profiles",
    "xmax_moments",
]
