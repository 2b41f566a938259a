"""What happens in a synthetic video: scene sampling, exact 2D elastic disk physics, the CLEVRER annotation.

Objects slide on the floor (event-driven elastic collisions, so they never interpenetrate); cubes also spin
about the vertical axis (a sphere's or cylinder's yaw is invisible, so they keep theirs); a share of the
objects start outside the view and slide in. Everything is a pure function of the random generator it is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import Synthetic
from pipeline.data.render import CENTER_Z, COLORS, DISK, MASS, MATERIALS, SHAPES, Camera, aabb_corners

__all__ = ["Scene", "simulate", "sample_scene", "annotation"]

# Motion (scene units per frame at 25 fps): ~0.5-2 px/frame once a 192x128 render is shrunk to 64x64.
SPEED_RANGE = (0.10, 0.24)
SPIN_RANGE = (0.03, 0.09)          # cube yaw rate, radians per frame
REST_PROB = 0.2                    # share of in-view objects that start at rest (and may be hit)
AIM_PROB = 0.6                     # share of moving objects aimed at another object (collisions)


# ----------------------------------------------------------------------------------------------
# physics


def simulate(pos: np.ndarray, vel: np.ndarray, radius: np.ndarray, mass: np.ndarray, n_frames: int
             ) -> tuple[np.ndarray, np.ndarray, list[tuple[float, int, int, np.ndarray]]]:
    """Exact event-driven 2D elastic disk physics.

    pos, vel [K,2] (units, units per frame), radius, mass [K] -> positions [T,K,2], velocities [T,K,2]
    at every frame, and collisions [(time in frames, i, j, contact point [2])] in time order.
    """
    pos, vel = pos.astype(np.float64).copy(), vel.astype(np.float64).copy()
    k = len(pos)
    iu, ju = np.triu_indices(k, 1)
    rsum = radius[iu] + radius[ju]
    out_pos, out_vel, events = [pos.copy()], [vel.copy()], []
    for frame in range(n_frames - 1):
        t = 0.0
        for _ in range(10000):
            dp = pos[ju] - pos[iu]  # [P,2]
            dv = vel[ju] - vel[iu]
            a = (dv * dv).sum(-1)
            b = (dp * dv).sum(-1)
            c = (dp * dp).sum(-1) - rsum ** 2
            disc = b * b - a * c
            with np.errstate(divide="ignore", invalid="ignore"):
                tau = np.where((b < 0) & (disc >= 0) & (a > 0), (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
            tau = np.maximum(tau, 0.0)  # touching pairs (c ~ 0) that approach collide now
            p = int(np.argmin(tau)) if len(tau) else 0
            if not len(tau) or tau[p] > 1.0 - t:
                pos += vel * (1.0 - t)
                break
            pos += vel * tau[p]
            t += tau[p]
            i, j = iu[p], ju[p]
            n = pos[j] - pos[i]
            n /= np.linalg.norm(n)
            rel = float((vel[i] - vel[j]) @ n)  # > 0: approaching
            vel[i] -= 2 * mass[j] / (mass[i] + mass[j]) * rel * n
            vel[j] += 2 * mass[i] / (mass[i] + mass[j]) * rel * n
            events.append((frame + t, int(i), int(j), pos[i] + n * radius[i]))
        else:
            raise RuntimeError("collision solver did not converge (too many events in one frame)")
        out_pos.append(pos.copy())
        out_vel.append(vel.copy())
    return np.stack(out_pos), np.stack(out_vel), events


# ----------------------------------------------------------------------------------------------
# scene sampling


@dataclass
class Scene:
    shapes: list[str]
    colors: list[str]
    materials: list[str]
    pos: np.ndarray      # [T,K,2]
    vel: np.ndarray      # [T,K,2] per frame
    yaw: np.ndarray      # [T,K]
    spin: np.ndarray     # [K] radians per frame
    collisions: list[tuple[float, int, int, np.ndarray]]


def _in_view(cam: Camera, x: float, y: float, shape: str, margin: float) -> bool:
    """Whether the object's whole bounding box projects inside the image, `margin` px from the edges."""
    px = cam.project(aabb_corners(x, y, shape))
    return bool((px[:, 0] >= margin).all() and (px[:, 0] <= cam.width - 1 - margin).all()
                and (px[:, 1] >= margin).all() and (px[:, 1] <= cam.height - 1 - margin).all())


def _out_of_view(cam: Camera, x: float, y: float, shape: str) -> bool:
    """Whether the object's bounding box projects entirely outside the image."""
    px = cam.project(aabb_corners(x, y, shape))
    return bool((px[:, 0] < -0.5).all() or (px[:, 0] > cam.width - 0.5).all()
                or (px[:, 1] < -0.5).all() or (px[:, 1] > cam.height - 0.5).all())


def sample_scene(rng: np.random.Generator, cam: Camera, syn: Synthetic) -> Scene:
    """Random objects, initial state and the simulated motion of one video."""
    k = int(rng.integers(syn.min_objects, syn.max_objects + 1))
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), k)]
    colors = [list(COLORS)[i] for i in rng.integers(0, len(COLORS), k)]
    materials = [MATERIALS[i] for i in rng.integers(0, len(MATERIALS), k)]
    entering = rng.random(k) < syn.enter_fraction
    if entering.all():  # keep at least one object in view from the first frame
        entering[int(rng.integers(k))] = False
    radius = np.array([DISK[s] for s in shapes])
    mass = np.array([MASS[s] for s in shapes])
    pos = np.zeros((k, 2))
    vel = np.zeros((k, 2))
    placed: list[int] = []

    def free(i: int, p: np.ndarray) -> bool:
        return all(np.linalg.norm(p - pos[j]) > radius[i] + radius[j] + 0.15 for j in placed)

    for i in np.flatnonzero(~entering):
        for _ in range(500):
            p = np.array([rng.uniform(-5.5, 5.5), rng.uniform(-3.5, 5.5)])
            if _in_view(cam, p[0], p[1], shapes[i], margin=4.0) and free(i, p):
                break
        else:
            raise RuntimeError(f"could not place {k} objects without overlap; lower synthetic.max_objects")
        pos[i] = p
        placed.append(int(i))
    for i in placed:  # velocities: at rest, aimed at another object, or a random heading
        if rng.random() < REST_PROB:
            continue
        others = [j for j in placed if j != i]
        speed = rng.uniform(*SPEED_RANGE)
        if others and rng.random() < AIM_PROB:
            j = others[int(rng.integers(len(others)))]
            heading = math.atan2(*(pos[j] - pos[i])[::-1]) + rng.normal(0, 0.15)
        else:
            heading = rng.uniform(-math.pi, math.pi)
        vel[i] = speed * np.array([math.cos(heading), math.sin(heading)])
    horizon = syn.frames
    for i in np.flatnonzero(entering):  # start outside the view, slide in at a random frame
        for _ in range(500):
            target = np.array([rng.uniform(-3.0, 3.0), rng.uniform(-1.5, 3.5)])
            heading = rng.uniform(-math.pi, math.pi)
            u = np.array([math.cos(heading), math.sin(heading)])
            speed = rng.uniform(*SPEED_RANGE)
            back = 0.0  # walk back from the target until the object is out of view
            while not _out_of_view(cam, *(target - u * back), shapes[i]) and back < 20:
                back += 0.1
            p = target - u * (back + speed * rng.uniform(0.0, horizon / 3))
            if back < 20 and free(i, p):
                break
        else:
            raise RuntimeError("could not place an entering object")
        pos[i], vel[i] = p, speed * u
        placed.append(int(i))
    spin = np.where(np.array(shapes) == "cube", rng.uniform(*SPIN_RANGE, k) * rng.choice([-1, 1], k), 0.0)
    yaw0 = rng.uniform(0, math.pi / 2, k) * (np.array(shapes) == "cube")
    traj, vels, events = simulate(pos, vel, radius, mass, syn.frames)
    yaw = yaw0[None] + spin[None] * np.arange(syn.frames)[:, None]
    return Scene(shapes, colors, materials, traj, vels, yaw, spin, events)


def _r(x) -> list[float]:
    return [round(float(v), 6) + 0.0 for v in x]


def annotation(video_id: int, scene: Scene, box_mask: np.ndarray, fps: int) -> dict:
    """CLEVRER's annotation schema (velocities per second, angles in radians)."""
    k = len(scene.shapes)
    props = [{"object_id": i, "color": scene.colors[i], "material": scene.materials[i], "shape": scene.shapes[i]}
             for i in range(k)]
    traj = []
    for t in range(scene.pos.shape[0]):
        objs = []
        for i in range(k):
            x, y = scene.pos[t, i]
            vx, vy = scene.vel[t, i] * fps
            objs.append({"object_id": i, "location": _r([x, y, CENTER_Z[scene.shapes[i]]]),
                         "orientation": _r([0.0, 0.0, scene.yaw[t, i]]), "velocity": _r([vx, vy, 0.0]),
                         "angular_velocity": _r([0.0, 0.0, scene.spin[i] * fps]),
                         "inside_camera_view": bool(box_mask[t, i])})
        traj.append({"frame_id": t, "objects": objs})
    n_t = scene.pos.shape[0]
    collisions = [{"object_ids": [i, j], "frame_id": min(int(round(when)), n_t - 1),
                   "location": _r([p[0], p[1], min(CENTER_Z[scene.shapes[i]], CENTER_Z[scene.shapes[j]])])}
                  for when, i, j, p in scene.collisions]
    return {"scene_index": int(video_id), "video_filename": f"video_{video_id:05d}.mp4",
            "object_property": props, "motion_trajectory": traj, "collision": collisions}
