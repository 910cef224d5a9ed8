"""Geant4 Par04's inference contract for an exported sampler (``export_onnx(..., layout="par04")``).

What Par04's ONNX path does (Geant4 ``examples/extended/parameterisations/Par04``, files
``src/Par04InferenceSetup.cc``, ``include/Par04InferenceSetup.hh``, ``src/Par04OnnxInference.cc``,
``src/Par04MLFastSimModel.cc``), and so what the graph of this layout takes and gives:

- one input, shape (1, D + 4) float32 (Par04 feeds a single tensor of dims {1, size}): D
  standard-normal numbers, then the conditions as ``Par04InferenceSetup::GetEnergies`` writes them:
  the energy E / ``fMaxEnergy`` (E in MeV, ``fMaxEnergy`` = 1024000 MeV), the angle
  ``direction.theta()`` in degrees / ``fMaxAngle`` (90), and a geometry one-hot of two numbers
  (Par04 writes (0, 1)). The one-hot is accepted and not used: a fastshower run knows one geometry.
- one output, shape (1, N) float32: the cell energies divided by E, which Par04 multiplies by E; in the
  order of ``Par04InferenceSetup::GetPositions``: radial index slowest, then phi, then z fastest,
  p = (i_r * N_phi + i_phi) * N_z + i_z, with the centre of phi cell k at (k + 0.5) 2 pi / N_phi - pi.

fastshower (CaloChallenge) order is the other way round: c = (i_z * N_alpha + i_alpha) * N_r + i_r
(layers slowest, radial bins fastest), alpha bins from -180 degrees, so alpha bin k and Par04's phi cell
k cover the same angles (:func:`par04_permutation`; a run whose files bin alpha from 0 is rotated first).

Angle: Par04's gun shoots along y into a calorimeter whose axis is z (``common_settings.mac``:
``/gun/direction 0 1 0``), so normal incidence is theta = 90 degrees; a run with an ``angle``
condition (polar angle to the calorimeter normal, degrees) gets 90 - theta, and phi 0 where the
condition has a second column. A run without it ignores the angle input. Runs on other geometries, or
with conditions Par04 does not provide (e.g. ``position``), are refused (:func:`check_par04_run`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from fastshower.deploy.quantize import ExportError
from fastshower.geometry import Geometry, PolarSegmentation, alpha_permutation, get_geometry
from fastshower.runs import RunInfo
from fastshower.sampling import SamplerModule

__all__ = [
    "PAR04_GEOMETRIES",
    "PAR04_MAX_ANGLE_DEG",
    "PAR04_MAX_ENERGY_MEV",
    "Par04Module",
    "check_par04_run",
    "par04_input",
    "par04_mesh",
    "par04_permutation",
]

#: geometries whose mesh is Par04's (CaloChallenge datasets 2 and 3)
PAR04_GEOMETRIES: tuple[str, ...] = ("par04-ds2", "par04-ds3")
#: Par04InferenceSetup.hh ``fMaxEnergy``: the energy condition is E / this, MeV
PAR04_MAX_ENERGY_MEV = 1024000.0
#: Par04InferenceSetup.hh ``fMaxAngle``: the angle condition is theta / this, degrees
PAR04_MAX_ANGLE_DEG = 90.0
#: theta of normal incidence in Par04 (gun along y, calorimeter axis z), degrees
_NORMAL_THETA_DEG = 90.0
#: conditions Par04 appends to the latent vector: energy, angle, geometry one-hot (2)
N_PAR04_CONDITIONS = 4


def check_par04_run(info: RunInfo) -> None:
    """ExportError (one line) unless the run's geometry has Par04's mesh and its conditions are ones
    Par04 provides (energy, and optionally ``angle``)."""
    if info.geometry.name not in PAR04_GEOMETRIES:
        raise ExportError(f"--layout par04 needs a run on {' or '.join(PAR04_GEOMETRIES)}; run {info.run_id} "
                          f"is on {info.geometry.name}")
    extra = [k for k in info.cond_names if k != "angle"]
    if extra:
        raise ExportError(f"--layout par04: run {info.run_id} conditions on {extra}, which Par04's input "
                          "(energy, angle, geometry one-hot) does not carry")


def par04_mesh(geometry: Geometry) -> tuple[int, int, int]:
    """(N_r, N_phi, N_z) of a Par04 geometry: radial bins, angular bins, layers."""
    seg = geometry.layers[0].segmentation
    if not isinstance(seg, PolarSegmentation):
        raise ExportError(f"{geometry.name}: not a polar readout")
    return seg.n_r, seg.n_alpha, len(geometry.layers)


def par04_permutation(geometry: Geometry) -> np.ndarray:
    """Indices (V,) int64 with ``par04[:, p] = showers[:, perm[p]]``: a shower of ``geometry`` in
    fastshower (CaloChallenge) voxel order to Par04's mesh order (r slowest, phi, z fastest)."""
    n_r, n_phi, n_z = par04_mesh(geometry)
    # alpha bins from -180 deg, as Par04's phi cells; files of fastshower 0.1 started at 0
    to_standard = alpha_permutation(geometry, get_geometry(geometry.name))
    order = np.arange(geometry.n_voxels, dtype=np.int64).reshape(n_z, n_phi, n_r).transpose(2, 1, 0).ravel()
    # Par04 cell p is standard voxel order[p], which is the run's voxel to_standard[order[p]]
    return to_standard[order]


class Par04Module(nn.Module):
    """A run's sampler behind Par04's contract: ``forward(x (1, D + 4))`` -> cell energies / E (1, V) in
    Par04's mesh order (see the module docstring)."""

    def __init__(self, sampler: SamplerModule, info: RunInfo, noise_dim: int) -> None:
        super().__init__()
        check_par04_run(info)
        self.sampler = sampler
        self.noise_dim = noise_dim
        self.angle_width = dict(zip(info.cond_names, info.cond_widths, strict=True)).get("angle", 0)
        self.register_buffer("perm", torch.as_tensor(par04_permutation(info.geometry)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        d = self.noise_dim
        noise = x[:, :d]
        e_mev = x[:, d:d + 1] * PAR04_MAX_ENERGY_MEV
        conds = []
        if self.angle_width:
            theta = x[:, d + 1:d + 2] * PAR04_MAX_ANGLE_DEG
            angle = _NORMAL_THETA_DEG - theta
            if self.angle_width == 2:  # (theta, phi): Par04 gives no azimuth; its mesh follows the direction
                angle = torch.cat([angle, torch.zeros_like(angle)], dim=1)
            conds.append(angle)
        showers = self.sampler(noise, e_mev, *conds)
        return showers[:, self.perm] / e_mev


def par04_input(noise: np.ndarray, energy_mev: float, theta_deg: float = _NORMAL_THETA_DEG,
                one_hot: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Par04's input vector (1, D + 4) float32, as ``Par04InferenceSetup::GetEnergies`` builds it: noise
    (D,), E / 1024000 MeV, theta (degrees, to the calorimeter axis; 90 = normal incidence) / 90, one-hot."""
    z = np.asarray(noise, dtype=np.float32).reshape(-1)
    cond = [energy_mev / PAR04_MAX_ENERGY_MEV, theta_deg / PAR04_MAX_ANGLE_DEG, *one_hot]
    return np.concatenate([z, np.asarray(cond, dtype=np.float32)]).reshape(1, -1)
