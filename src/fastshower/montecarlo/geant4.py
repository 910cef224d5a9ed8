"""Geant4 backend: full simulation of showers in a :class:`~fastshower.geometry.Geometry`.

Runs inside a worker process (Geant4 can be initialised once per process, aborts the
process on a fatal error, and its multithreaded run managers deadlock on the GIL):
one :class:`Geant4Session` per process, then any number of :meth:`Geant4Session.run` calls.

Detector: a world of ``G4_Galactic``; the readout layers stacked along +z from z = 0,
each pair as absorber slab then active slab. Cartesian layers are as wide as their
read-out area and are built from replicated cells (rows along y, columns along x); the
energy in them is scored in C++ by a ``G4MultiFunctionalDetector`` with a
``G4PSEnergyDeposit3D`` per readout layer and read once per event. Polar layers are
cylinders of radius ``max(3 r_max, 300 mm)``; their cells move with the incident particle,
so their steps are collected by a light Python sensitive detector and binned with numpy
once per event (energy beyond the last radial edge is dropped): as in Geant4's Par04, in the
frame of the primary's entry point and direction, so a tilted shower is binned along its own
axis, its layers by depth along that axis.

The gun enters the front face at a given (x, y) along a given direction; it starts 1 mm before the
first material on that line (the front face, or an optional upstream slab
:data:`~fastshower.montecarlo.incidence.UPSTREAM_GAP_MM` before it).

With a :class:`~fastshower.montecarlo.fastsim.FastSimHook` the world volume gets a Python sensitive detector
that kills the e+/e-/gamma a trained run replaces where they cross the front face, and at the end of each
event the run's showers join the event's deposits, scored by the same readout (:mod:`.fastsim`).
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from fastshower.errors import FastshowerError
from fastshower.geometry import (
    CartesianSegmentation,
    Geometry,
    GeometryError,
    PolarSegmentation,
    ReadoutLayer,
    Segmentation,
)
from fastshower.montecarlo.fastsim import FastSimHook, cartesian_cells, readout_layer
from fastshower.montecarlo.g4data import G4DataInfo, Geant4DataError, apply_environment, elements_of, resolve_data
from fastshower.montecarlo.incidence import UPSTREAM_GAP_MM, polar_radius

__all__ = ["PARTICLES", "Geant4Error", "Geant4Session"]

PARTICLES = {"e-": 11, "e+": -11, "gamma": 22, "pi+": 211, "pi-": -211}
HADRONS = {"pi+", "pi-"}

_SESSION_OPEN = False


class Geant4Error(FastshowerError, RuntimeError):
    """The Geant4 backend cannot run what was asked."""


class _Quiet(io.TextIOBase):
    """Swallows Geant4's G4cout (routed through Python's sys.stdout) except exception banners."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._keep = False

    def write(self, s: str) -> int:
        if "G4Exception" in s or "-------- EEEE" in s or "-------- WWWW" in s:
            self._keep = "END" not in s
            self._target.write(s)
        elif self._keep:
            self._target.write(s)
        return len(s)

    def flush(self) -> None:
        self._target.flush()


def _import_g4(info: G4DataInfo):
    if "geant4_pybind" in sys.modules:
        want = info.env.get("G4LEDATA")
        if want and os.environ.get("G4LEDATA") != want:
            raise Geant4Error(
                "geant4_pybind was imported before the Geant4 data environment was set; "
                "create the Geant4Session in a fresh worker process"
            )
    apply_environment(info)
    import geant4_pybind as g4

    return g4


def _transverse_half_width(seg: Segmentation) -> float:
    """Half of the transverse size a layer needs in the world, mm."""
    if isinstance(seg, CartesianSegmentation):
        hx, hy = seg.half_width
        return max(hx, hy)
    return polar_radius(seg)


def _par04_frame(x: np.ndarray, y: np.ndarray, z: np.ndarray, entry: tuple[float, float, float],
                 u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (mm, world frame; shape (m,) each) in the frame of the entry point (mm) and unit direction ``u``
    (3,): (x, y) across and the depth along the direction, mm. The rotation is Par04's (Rz(-phi), then
    Ry(-theta)), so at normal incidence this is a plain shift to the entry point."""
    dx, dy, dz = x - entry[0], y - entry[1], z - entry[2]
    theta, phi = math.acos(min(1.0, float(u[2]))), math.atan2(float(u[1]), float(u[0]))
    ct, st, cp, sp = math.cos(theta), math.sin(theta), math.cos(phi), math.sin(phi)
    x1, y1 = cp * dx + sp * dy, -sp * dx + cp * dy
    return ct * x1 - st * dz, y1, st * x1 + ct * dz


def _slabs(layer: ReadoutLayer) -> list[tuple[str, str, float, bool]]:
    """The slabs of one absorber + active pair, in beam order: (kind "abs"/"act", material, thickness mm, scores)."""
    slabs = []
    if layer.absorber and layer.absorber_thickness > 0:
        slabs.append(("abs", layer.absorber, layer.absorber_thickness, layer.score == "all"))
    slabs.append(("act", layer.active, layer.active_thickness, True))
    return slabs


def _physics_list(g4: Any, session: Geant4Session) -> Any:
    """The session's physics list, with one production cut (``session.cut_mm``) for all particles.

    Standard EM and decays (``session.physics == "em"``), plus the hadronic constructors of Geant4's
    reference list FTFP_BERT (``"ftfp_bert"``).
    """

    class PhysicsList(g4.G4VModularPhysicsList):
        def __init__(self) -> None:
            super().__init__()
            self.SetVerboseLevel(0)
            self.SetDefaultCutValue(session.cut_mm * g4.mm)
            self.RegisterPhysics(g4.G4EmStandardPhysics())
            self.RegisterPhysics(g4.G4DecayPhysics())
            if session.physics == "ftfp_bert":
                # The constructors of Geant4's reference list FTFP_BERT (FTFP_BERT.cc), registered in a
                # subclass: a bare G4VModularPhysicsList segfaults at exit with these bindings.
                for ctor in ("G4EmExtraPhysics", "G4HadronElasticPhysics", "G4HadronPhysicsFTFP_BERT",
                             "G4StoppingPhysics", "G4IonPhysics", "G4NeutronTrackingCut"):
                    self.RegisterPhysics(getattr(g4, ctor)())

    return PhysicsList()


def _detector_construction(g4: Any, session: Geant4Session) -> Any:
    """The detector construction: volumes from :meth:`Geant4Session._construct`, scoring from ``_construct_sd``."""

    class Detector(g4.G4VUserDetectorConstruction):
        def Construct(self) -> Any:
            return session._construct(g4)

        def ConstructSDandField(self) -> None:
            session._construct_sd(g4)

    return Detector()


def _action_initialization(g4: Any, session: Geant4Session) -> Any:
    """The user actions: a particle gun and the end-of-event scoring (:meth:`Geant4Session._end_of_event`).

    Event i shoots ``session.particle`` with ``session._energy[i]`` MeV along ``session._dir[i]`` (unit
    vector) through ``session._pos[i]`` (x, y in mm) on the front face, from 1 mm before the first material.
    """

    class Gun(g4.G4VUserPrimaryGeneratorAction):
        def __init__(self) -> None:
            super().__init__()
            self.gun = g4.G4ParticleGun(1)
            table = g4.G4ParticleTable.GetParticleTable()
            self.gun.SetParticleDefinition(table.FindParticle(session.particle))

        def GeneratePrimaries(self, event: Any) -> None:
            i = event.GetEventID()
            x, y = session._pos[i]
            u = session._dir[i]
            back = (session._lead_mm + 1.0) / u[2]  # path back from the entry point to the start, mm
            self.gun.SetParticleEnergy(float(session._energy[i]) * g4.MeV)
            self.gun.SetParticleMomentumDirection(g4.G4ThreeVector(float(u[0]), float(u[1]), float(u[2])))
            self.gun.SetParticlePosition(g4.G4ThreeVector(float(x - back * u[0]), float(y - back * u[1]),
                                                          session._z0 - back * u[2]))
            self.gun.GeneratePrimaryVertex(event)

    class EventAction(g4.G4UserEventAction):
        def EndOfEventAction(self, event: Any) -> None:
            session._end_of_event(event)
            if session.on_event is not None:  # progress only: it touches neither the RNG nor the output
                session.on_event()

    class Actions(g4.G4VUserActionInitialization):
        def Build(self) -> None:
            self.SetUserAction(Gun())
            self.SetUserAction(EventAction())

    return Actions()


class Geant4Session:
    """One Geant4 detector + physics list in this process; :meth:`run` simulates showers.

    Args:
        geometry: a calorimeter geometry (layers with real NIST materials).
        particle: one of :data:`PARTICLES`.
        cut_mm: production cut (all particles), mm.
        data: Geant4 data to use; by default :func:`~fastshower.montecarlo.g4data.resolve_data`
            with mode "auto" (substitute EM tables when the official sets are absent).
        physics: ``"auto"`` (EM list for e/gamma, FTFP_BERT for pions), ``"em"`` or ``"ftfp_bert"``.
        upstream: (NIST material, thickness mm) of a slab before the calorimeter, or None.
        max_angle_deg: largest polar angle :meth:`run` will be given, degrees (sizes the world).
        fastsim: fast simulation by a trained run (:mod:`.fastsim`); None: full simulation.
    """

    #: called after each simulated event (the driver's per-shower progress); None: nothing is called
    on_event: Callable[[], None] | None = None

    def __init__(
        self,
        geometry: Geometry,
        particle: str,
        cut_mm: float = 0.7,
        data: G4DataInfo | None = None,
        physics: str = "auto",
        upstream: tuple[str, float] | None = None,
        max_angle_deg: float = 0.0, fastsim: FastSimHook | None = None,
    ) -> None:
        global _SESSION_OPEN
        if _SESSION_OPEN:
            raise Geant4Error("Geant4 can be initialised once per process; reuse the existing Geant4Session")
        if particle not in PARTICLES:
            raise Geant4Error(f"unknown particle {particle!r}; choose one of {', '.join(PARTICLES)}")
        if geometry.kind != "calorimeter" or not geometry.layers:
            raise GeometryError(f"{geometry.name}: Geant4 simulates calorimeter geometries only")
        for layer in geometry.layers:
            if layer.active == "unknown":
                raise GeometryError(f"{geometry.name}: layers without materials cannot be simulated")
        if physics == "auto":
            physics = "ftfp_bert" if particle in HADRONS else "em"
        if physics not in ("em", "ftfp_bert"):
            raise Geant4Error(f"unknown physics {physics!r}; use auto, em or ftfp_bert")
        if not 0.0 <= max_angle_deg < 90.0:
            raise Geant4Error(f"max_angle_deg must lie in [0, 90), got {max_angle_deg!r}")
        hadronic = physics == "ftfp_bert"
        if data is None:
            extra = [upstream[0]] if upstream is not None else []
            data = resolve_data(elements_of([*geometry.materials(), *extra, "G4_Galactic"]), "auto",
                                hadronic=hadronic)
        elif hadronic and data.mode != "official":
            raise Geant4DataError(
                "hadronic showers (FTFP_BERT) need Geant4's official data sets (G4EMLOW, G4ENSDFSTATE, "
                "PhotonEvaporation, G4PARTICLEXS, G4SAIDDATA); set GEANT4_DATA_DIR to them"
            )
        self.geometry = geometry
        self.particle = particle
        self.cut_mm = float(cut_mm)
        self.data = data
        self.physics = physics
        self.upstream = upstream
        self.fastsim = fastsim
        # the gun starts this far before the front face (mm along z): the upstream slab and its gap
        self._lead_mm = upstream[1] + UPSTREAM_GAP_MM if upstream is not None else 0.0
        self._tan_max = math.tan(math.radians(max_angle_deg))
        self.provenance = data.provenance
        self.physics_list = (
            "FTFP_BERT (G4EmStandardPhysics + hadronic constructors)" if hadronic
            else "G4EmStandardPhysics + G4DecayPhysics"
        )
        _SESSION_OPEN = True

        self._stdout = sys.stdout
        sys.stdout = _Quiet(self._stdout)
        try:
            self._g4 = g4 = _import_g4(data)
            self._build(g4)
        finally:
            sys.stdout = self._stdout

    # --- construction -------------------------------------------------------------------------
    def _build(self, g4: Any) -> None:
        """Create the serial run manager with this session's detector, physics list and actions.

        Geant4's verbosity is turned down before and after initialisation, and the physics tables are built
        at once (``BeamOn(0)``) so that the first :meth:`run` starts like any other.
        """
        ui = g4.G4UImanager.GetUIpointer()
        for cmd in ("/control/verbose 0", "/run/verbose 0", "/event/verbose 0", "/tracking/verbose 0",
                    "/process/verbose 0", "/process/em/verbose 0", "/process/had/verbose 0",
                    "/material/verbose 0"):
            ui.ApplyCommand(cmd)
        self._rm = rm = g4.G4RunManagerFactory.CreateRunManager(g4.G4RunManagerType.Serial)
        # keep Python wrappers alive for the life of the run manager
        self._keep: list[Any] = []
        self._det = _detector_construction(g4, self)
        self._phys = _physics_list(g4, self)
        self._actions = _action_initialization(g4, self)
        rm.SetUserInitialization(self._det)
        rm.SetUserInitialization(self._phys)
        rm.SetUserInitialization(self._actions)
        g4.G4EmParameters.Instance().SetVerbose(0)
        for cmd in ("/process/em/verbose 0", "/process/had/verbose 0"):
            ui.ApplyCommand(cmd)
        rm.Initialize()
        for cmd in ("/run/verbose 0", "/event/verbose 0", "/tracking/verbose 0", "/process/em/verbose 0"):
            ui.ApplyCommand(cmd)
        self._energy = np.zeros(1)
        self._pos = np.zeros((1, 2))
        self._dir = np.array([[0.0, 0.0, 1.0]])
        self._out = np.zeros((0, self.geometry.n_voxels), dtype=np.float32)
        rm.BeamOn(0)  # build physics tables now, so the first run() starts like any other

    def _material(self, g4: Any, name: str) -> Any:
        """The NIST material ``name`` (built once per session); GeometryError if Geant4 does not know it."""
        if name not in self._mats:
            m = self._nist.FindOrBuildMaterial(name)
            if m is None:
                raise GeometryError(f"Geant4 does not know the material {name!r}")
            self._mats[name] = m
        return self._mats[name]

    def _construct(self, g4: Any) -> Any:
        """The detector (see the module docstring); returns the world's physical volume.

        The world is centred on the calorimeter, so z = 0 of the stack lies at -depth/2 (``_z0``); it
        reaches the gun's start before the upstream slab, also at the largest angle.
        ``_scoring_lvs`` gets, per readout layer, the logical volumes whose energy is scored.
        """
        geo = self.geometry
        self._nist = g4.G4NistManager.Instance()
        self._mats: dict[str, Any] = {}
        half = max([0.0, *(_transverse_half_width(layer.segmentation) for layer in geo.layers)])
        half += 10.0 + (self._lead_mm + 1.0) * self._tan_max  # 10 mm as before, plus the tilted gun's offset
        depth = geo.depth
        world_s = g4.G4Box("World", half, half, 0.5 * depth + 20.0 + self._lead_mm)
        world_l = g4.G4LogicalVolume(world_s, self._material(g4, "G4_Galactic"), "World")
        world_p = g4.G4PVPlacement(None, g4.G4ThreeVector(), world_l, "World", None, False, 0, False)
        self._keep += [world_s, world_l, world_p]
        self._world_l = world_l
        self._z0 = z = -0.5 * depth
        if self.upstream is not None:
            self._place_upstream(g4, world_l, half - 1.0)
        self._scoring_lvs: list[list[Any]] = []  # per readout layer: logical volumes that score
        for li, layer in enumerate(geo.layers):
            slabs: list[tuple[Any, float]] = []  # (logical volume, thickness mm) in beam order
            scoring: list[Any] = []
            for kind, mname, t, scores in _slabs(layer):
                lv, scoring_lv = self._slab_volume(g4, f"L{li}_{kind}", layer.segmentation,
                                                   self._material(g4, mname), t, scores)
                if scoring_lv is not None:
                    scoring.append(scoring_lv)
                slabs.append((lv, t))
            z = self._place_pairs(g4, world_l, layer.n_pairs, slabs, z)
            self._scoring_lvs.append(scoring)
        return world_p

    def _slab_volume(self, g4: Any, name: str, seg: Segmentation, material: Any, t: float,
                     scores: bool) -> tuple[Any, Any]:
        """One slab of a readout layer, ``t`` mm thick: (its logical volume, the volume that scores or None).

        A cartesian slab is as wide as the read-out; when it scores, it is filled with replicated rows
        (along y) of cells (along x), and the cell is the scoring volume. A polar slab is a cylinder of
        radius max(3 r_max, 300 mm) and scores itself.
        """
        keep = self._keep
        if isinstance(seg, PolarSegmentation):
            s = g4.G4Tubs(name, 0.0, polar_radius(seg), 0.5 * t, 0.0, 2 * math.pi)
            lv = g4.G4LogicalVolume(s, material, name)
            keep += [s, lv]
            return lv, (lv if scores else None)
        hx, hy = seg.half_width
        s = g4.G4Box(name, hx, hy, 0.5 * t)
        lv = g4.G4LogicalVolume(s, material, name)
        keep += [s, lv]
        if not scores:
            return lv, None
        rs = g4.G4Box(name + "_row", hx, 0.5 * seg.pitch_y, 0.5 * t)
        rl = g4.G4LogicalVolume(rs, material, name + "_row")
        cs = g4.G4Box(name + "_cell", 0.5 * seg.pitch_x, 0.5 * seg.pitch_y, 0.5 * t)
        cl = g4.G4LogicalVolume(cs, material, name + "_cell")
        rp = g4.G4PVReplica(name + "_row", rl, lv, g4.EAxis.kYAxis, seg.ny, seg.pitch_y)
        cp = g4.G4PVReplica(name + "_cell", cl, rl, g4.EAxis.kXAxis, seg.nx, seg.pitch_x)
        keep += [rs, rl, cs, cl, rp, cp]
        return lv, cl

    def _place_upstream(self, g4: Any, world_l: Any, half: float) -> None:
        """The upstream slab: ``self.upstream`` (material, thickness mm), ``2 half`` mm wide, its back face
        UPSTREAM_GAP_MM before the front face (``_z0``); it does not score."""
        material, t = self.upstream  # type: ignore[misc]
        s = g4.G4Box("Upstream", half, half, 0.5 * t)
        lv = g4.G4LogicalVolume(s, self._material(g4, material), "Upstream")
        z = self._z0 - UPSTREAM_GAP_MM - 0.5 * t
        pv = g4.G4PVPlacement(None, g4.G4ThreeVector(0, 0, z), lv, "Upstream", world_l, False, 0, False)
        self._keep += [s, lv, pv]

    def _place_pairs(self, g4: Any, world_l: Any, n_pairs: int, slabs: list[tuple[Any, float]], z: float) -> float:
        """Place ``n_pairs`` copies of a layer's slabs in the world, from ``z`` (mm, world frame) on.

        ``slabs``: (logical volume, thickness mm) in beam order. Returns the z where the layer ends, mm.
        """
        for _ in range(n_pairs):
            for lv, t in slabs:
                pv = g4.G4PVPlacement(None, g4.G4ThreeVector(0, 0, z + 0.5 * t), lv, lv.GetName(),
                                      world_l, False, 0, False)
                self._keep.append(pv)
                z += t
        return z

    def _construct_sd(self, g4: Any) -> None:
        geo = self.geometry
        sdm = g4.G4SDManager.GetSDMpointer()
        sdm.SetVerboseLevel(0)
        self._hc_ids: list[tuple[int, int]] = []  # (layer, collection id) for C++-scored layers
        self._py_layers: list[int] = []
        self._steps: dict[int, list[list[float]]] = {}
        session = self

        class PolarSD(g4.G4VSensitiveDetector):
            def __init__(self, name: str, layer: int) -> None:
                super().__init__(name)
                self.buf = session._steps.setdefault(layer, [[], [], [], []])

            def ProcessHits(self, step: Any, history: Any) -> bool:
                e = step.GetTotalEnergyDeposit()
                if e > 0.0:
                    a = step.GetPreStepPoint().GetPosition()
                    b = step.GetPostStepPoint().GetPosition()
                    buf = self.buf
                    buf[0].append(0.5 * (a.x + b.x))
                    buf[1].append(0.5 * (a.y + b.y))
                    buf[2].append(0.5 * (a.z + b.z))
                    buf[3].append(e)
                return True

        self._mfd_names: list[str] = []
        for li, layer in enumerate(geo.layers):
            seg = layer.segmentation
            if isinstance(seg, CartesianSegmentation):
                det = g4.G4MultiFunctionalDetector(f"mfd{li}")
                # index = row * nx + column: rows are copy numbers one level up, columns at the cell
                ps = g4.G4PSEnergyDeposit3D("edep", seg.ny, seg.nx, 1, 1, 0, 2)
                det.RegisterPrimitive(ps)
                sdm.AddNewDetector(det)
                for lv in self._scoring_lvs[li]:
                    lv.SetSensitiveDetector(det)
                self._keep += [det, ps]
                self._mfd_names.append(f"mfd{li}/edep")
            else:
                sd = PolarSD(f"polar{li}", li)
                sdm.AddNewDetector(sd)
                for lv in self._scoring_lvs[li]:
                    lv.SetSensitiveDetector(sd)
                self._keep.append(sd)
                self._py_layers.append(li)
        if self.fastsim is not None:  # the world's steps: the e+/e-/gamma the run replaces die on the front face
            sd = self.fastsim.sensitive_detector(g4, self._z0)
            sdm.AddNewDetector(sd)
            self._world_l.SetSensitiveDetector(sd)
            self._keep.append(sd)
        self._hc_resolved = False

    # --- per event ----------------------------------------------------------------------------
    def _resolve_hc(self) -> None:
        sdm = self._g4.G4SDManager.GetSDMpointer()
        self._hc_ids = []
        k = 0
        for li, layer in enumerate(self.geometry.layers):
            if isinstance(layer.segmentation, CartesianSegmentation):
                self._hc_ids.append((li, sdm.GetCollectionID(self._mfd_names[k])))
                k += 1
        self._hc_resolved = True

    def _end_of_event(self, event: Any) -> None:
        i = event.GetEventID()
        if i >= self._out.shape[0]:
            return
        geo = self.geometry
        row = self._out[i]
        hce = event.GetHCofThisEvent()
        if hce is not None and self._mfd_names:
            if not self._hc_resolved:
                self._resolve_hc()
            for li, hcid in self._hc_ids:
                hmap = hce.GetHC(hcid)
                off = geo.layer_offsets[li]
                for idx, val in hmap:
                    row[off + idx] += val
        if self.fastsim is not None:
            self._add_fast_showers(row, i)
        if self._py_layers:
            self._bin_polar(row, i)

    def _add_fast_showers(self, row: np.ndarray, i: int) -> None:
        """Event ``i``'s showers from the fast simulation, scored as the readout scores Geant4's steps: a point in
        a cartesian layer adds to the cell under it in ``row``; a point in a polar layer joins that layer's steps
        (binned with them in the primary's mesh by :meth:`_bin_polar`)."""
        pts, e = self.fastsim.end_of_event(i)  # type: ignore[union-attr]
        layer = readout_layer(self.geometry, pts[:, 2] - self._z0)
        for li, lay in enumerate(self.geometry.layers):
            m = layer == li
            if not m.any():
                continue
            seg = lay.segmentation
            if isinstance(seg, CartesianSegmentation):
                cells = cartesian_cells(seg, pts[m, 0], pts[m, 1])
                ok = cells >= 0
                row[self.geometry.layer_slice(li)] += np.bincount(cells[ok], weights=e[m][ok],
                                                                  minlength=seg.n_cells).astype(np.float32)
            else:
                buf = self._steps[li]
                for k in range(3):
                    buf[k].extend(pts[m, k].tolist())
                buf[3].extend(e[m].tolist())

    def _polar_steps(self) -> tuple[np.ndarray, np.ndarray]:
        """This event's polar-layer steps, emptying the buffers: (x, y, z) mm (3, m) and [energy MeV, layer] (2, m)."""
        pos, eny = [np.zeros((3, 0))], [np.zeros((2, 0))]
        for li in self._py_layers:
            buf = self._steps[li]
            if buf[3]:
                pos.append(np.asarray(buf[:3], dtype=float))
                eny.append(np.stack([np.asarray(buf[3], dtype=float), np.full(len(buf[3]), float(li))]))
            for b in buf:
                b.clear()
        return np.concatenate(pos, axis=1), np.concatenate(eny, axis=1)

    def _bin_polar(self, row: np.ndarray, i: int) -> None:
        """Add event ``i``'s polar-layer energy to ``row`` (n_voxels,), binned as Par04's mesh: across and along
        the primary's direction from its entry point. A tilted shower's layer is its depth along the
        direction (energy beyond the polar layers is dropped); at normal incidence that is the step's volume."""
        geo = self.geometry
        (x, y, z), (e, vol) = self._polar_steps()
        u = self._dir[i]
        xr, yr, depth = _par04_frame(x, y, z, (*self._pos[i], self._z0), u)
        layer = vol.astype(int)
        if u[2] < 1.0:
            edges = np.concatenate([[0.0], np.cumsum([lay.thickness for lay in geo.layers])])
            layer = np.searchsorted(edges, depth, side="right") - 1
        for li in self._py_layers:
            m = layer == li
            if not m.any():
                continue
            seg: PolarSegmentation = geo.layers[li].segmentation  # type: ignore[assignment]
            ir = np.searchsorted(np.asarray(seg.r_edges), np.hypot(xr[m], yr[m]), side="right") - 1
            ia = seg.alpha_bin(xr[m], yr[m])
            ok = (ir >= 0) & (ir < seg.n_r)
            cells = ia[ok] * seg.n_r + ir[ok]
            row[geo.layer_slice(li)] += np.bincount(cells, weights=e[m][ok], minlength=seg.n_cells).astype(np.float32)

    # --- public -------------------------------------------------------------------------------
    def run(self, energies_mev: np.ndarray, positions_mm: np.ndarray, seed: int,
            directions: np.ndarray | None = None) -> np.ndarray:
        """Simulate one shower per entry; returns float32 (n, n_voxels) of deposited MeV.

        Args:
            energies_mev: kinetic energy of each incident particle, MeV, shape (n,).
            positions_mm: (x, y) entry point on the front face, mm, shape (n, 2).
            seed: random seed; the same seed and inputs give the same showers.
            directions: unit momentum directions, shape (n, 3), pointing into the calorimeter (z > 0) within
                the session's ``max_angle_deg``; default +z.
        """
        e = np.asarray(energies_mev, dtype=float).reshape(-1)
        p = np.asarray(positions_mm, dtype=float).reshape(-1, 2)
        u = np.tile([0.0, 0.0, 1.0], (e.shape[0], 1)) if directions is None else np.asarray(directions, dtype=float)
        if p.shape[0] != e.shape[0] or u.shape != (e.shape[0], 3):
            raise ValueError(f"{e.shape[0]} energies but {p.shape[0]} positions and {u.shape} directions")
        if (e <= 0).any() or not np.isfinite(e).all():
            raise ValueError("energies must be positive and finite")
        if (u[:, 2] < math.cos(math.atan(self._tan_max)) - 1e-9).any():
            raise ValueError("directions beyond the session's max_angle_deg (or not into the calorimeter)")
        n = e.shape[0]
        self._energy, self._pos, self._dir = e, p, u
        self._out = np.zeros((n, self.geometry.n_voxels), dtype=np.float32)
        for buf in self._steps.values():
            for b in buf:
                b.clear()
        if self.fastsim is not None:
            self.fastsim.begin_run(n, seed)
        if n == 0:
            return self._out
        g4 = self._g4
        seed = int(seed) % 900_000_000 + 1
        g4.HepRandom.setTheSeeds([seed, seed // 7 + 12345, 0])
        g4.HepRandom.setTheSeed(seed)
        sys.stdout = _Quiet(self._stdout)
        try:
            self._rm.BeamOn(n)
        finally:
            sys.stdout = self._stdout
        out = self._out
        self._out = np.zeros((0, self.geometry.n_voxels), dtype=np.float32)
        return out
