"""The synthetic renderer's look: a CLEVRER-like camera, an area light, ray casting and shading.

A static, tilted perspective camera over a gray floor; spheres, cubes and cylinders in CLEVR's colours and two
materials (rubber = matte, metal = specular + reflective); an area light gives soft cast shadows. World frame:
z up, the floor is z = 0, lengths in scene units (CLEVRER's). Image frame: pixel (x=j, y=i) is the centre of
column j, row i, so flow in pixels matches `pipeline.flow.ops.warp`. `Renderer.flow_and_vis` gives the exact
flow and visibility at pixel centres (each pixel's surface point moved with its object and re-projected).
What moves where is pipeline/data/scene.py; files and the worker pool are pipeline/data/synthetic.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.data.scene import Scene

__all__ = ["Camera", "Renderer", "Frame", "aabb_corners", "COLORS", "SHAPES", "MATERIALS", "DISK", "CENTER_Z", "MASS", "EPS"]

# CLEVR's palette (sRGB, 0..255), the one CLEVRER uses.
COLORS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
          "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
SHAPES = ("sphere", "cube", "cylinder")
MATERIALS = ("rubber", "metal")

# Object geometry (scene units). `disk` is the collision radius on the floor: the shape's footprint
# circle (a cube's circumscribed circle), so disks that never overlap mean solids that never touch.
SPHERE_R = 0.55
CUBE_S = 0.45                      # half side
CYL_R, CYL_H = 0.5, 0.45           # radius, half height
DISK = {"sphere": SPHERE_R, "cube": CUBE_S * math.sqrt(2.0), "cylinder": CYL_R}
CENTER_Z = {"sphere": SPHERE_R, "cube": CUBE_S, "cylinder": CYL_H}
MASS = {"sphere": 0.52, "cube": 0.73, "cylinder": 0.71}   # ~ volumes, for the elastic collisions

# Camera and light (CLEVRER-like: elevated, looking down at ~35 degrees).
CAM_POS = (0.0, -9.6, 6.5)
CAM_TARGET = (0.0, 0.6, 0.0)
CAM_HFOV_DEG = 48.0
LIGHT_POS = np.array([-5.0, -3.5, 9.0])
LIGHT_RADIUS = 1.4
# Fixed area-light samples (a disk facing down): soft shadows with no randomness.
_golden = math.pi * (3.0 - math.sqrt(5.0))
LIGHT_SAMPLES = np.array([[LIGHT_RADIUS * math.sqrt((i + 0.5) / 8) * math.cos(i * _golden),
                           LIGHT_RADIUS * math.sqrt((i + 0.5) / 8) * math.sin(i * _golden), 0.0]
                          for i in range(8)]) + LIGHT_POS  # [S,3]
AMBIENT = 0.42
DIFFUSE = 0.70
FLOOR_RGB = np.array([0.58, 0.58, 0.56])

EPS = 1e-6


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: pixel (x=j, y=i) is the centre of column j, row i."""
    width: int
    height: int

    def __post_init__(self):
        pos = np.array(CAM_POS)
        fwd = np.array(CAM_TARGET) - pos
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, fwd)
        object.__setattr__(self, "pos", pos)
        object.__setattr__(self, "axes", np.stack([right, up, fwd]))  # [3,3] rows: right, up, forward
        object.__setattr__(self, "focal", (self.width / 2) / math.tan(math.radians(CAM_HFOV_DEG) / 2))

    @property
    def center(self) -> tuple[float, float]:
        return (self.width - 1) / 2, (self.height - 1) / 2

    def rays(self) -> np.ndarray:
        """Unit ray directions [H,W,3] through every pixel centre."""
        cx, cy = self.center
        xs = (np.arange(self.width) - cx) / self.focal
        ys = (np.arange(self.height) - cy) / self.focal
        right, up, fwd = self.axes
        d = fwd + xs[None, :, None] * right - ys[:, None, None] * up  # [H,W,3]
        return d / np.linalg.norm(d, axis=-1, keepdims=True)

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points [...,3] -> pixel coordinates [...,2] (x right, y down)."""
        d = points - self.pos
        cam = d @ self.axes.T  # [...,3] (right, up, forward)
        z = np.maximum(cam[..., 2], 1e-3)
        cx, cy = self.center
        return np.stack([cx + self.focal * cam[..., 0] / z, cy - self.focal * cam[..., 1] / z], axis=-1)


# ----------------------------------------------------------------------------------------------
# geometry


def _rot(yaw: float) -> np.ndarray:
    """Rotation about z by yaw, [3,3] (local -> world)."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _intersect(shape: str, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Ray hit distance [N] against a shape centred at the origin of its local frame (inf on a miss).

    o [N,3] or [3] ray origins, d [N,3] directions (unit length for sphere), both in the local frame.
    Only hits in front of the origin (t > 1e-6) count; origins are never inside a solid.
    """
    inf = np.full(d.shape[0], np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if shape == "sphere":
            b = (o * d).sum(-1)
            c = (o * o).sum(-1) - SPHERE_R ** 2
            disc = b * b - c
            t = -b - np.sqrt(np.maximum(disc, 0.0))
            return np.where((disc >= 0) & (t > EPS), t, inf)
        if shape == "cube":
            inv = 1.0 / d
            t1 = (-CUBE_S - o) * inv
            t2 = (CUBE_S - o) * inv
            tmin = np.nanmax(np.minimum(t1, t2), axis=-1)
            tmax = np.nanmin(np.maximum(t1, t2), axis=-1)
            return np.where((tmax >= tmin) & (tmin > EPS), tmin, inf)
        if shape == "cylinder":
            ox, oy, oz = (o[..., i] for i in range(3))
            dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
            a = dx * dx + dy * dy
            b = ox * dx + oy * dy
            c = ox * ox + oy * oy - CYL_R ** 2
            disc = b * b - a * c
            ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
            side_ok = (disc >= 0) & (a > 0) & (ts > EPS) & (np.abs(oz + ts * dz) <= CYL_H)
            best = np.where(side_ok, ts, inf)
            for zcap in (CYL_H, -CYL_H):
                tc = (zcap - oz) / dz
                xc, yc = ox + tc * dx, oy + tc * dy
                cap_ok = (tc > EPS) & (xc * xc + yc * yc <= CYL_R ** 2)
                best = np.where(cap_ok & (tc < best), tc, best)
            return best
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _normal(shape: str, p: np.ndarray) -> np.ndarray:
    """Outward unit normals [N,3] at local surface points p [N,3]."""
    if shape == "sphere":
        return p / SPHERE_R
    if shape == "cube":
        axis = np.abs(p).argmax(-1)
        n = np.zeros_like(p)
        n[np.arange(len(p)), axis] = np.sign(p[np.arange(len(p)), axis])
        return n
    if shape == "cylinder":
        radial = np.maximum(np.hypot(p[:, 0], p[:, 1]), EPS)
        side = np.stack([p[:, 0] / radial, p[:, 1] / radial, np.zeros(len(p))], -1)
        cap = np.zeros_like(p)
        cap[:, 2] = np.sign(p[:, 2])
        return np.where((np.abs(p[:, 2]) >= CYL_H - 1e-7)[:, None], cap, side)
    raise ValueError(f"unknown shape {shape!r}")


def _hull_points(shape: str) -> np.ndarray:
    """Local points whose projections bound the object's silhouette [P,3]."""
    if shape == "cube":
        g = np.array([-1.0, 1.0]) * CUBE_S
        return np.array(np.meshgrid(g, g, g, indexing="ij")).reshape(3, -1).T
    if shape == "cylinder":
        a = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        ring = np.stack([CYL_R * np.cos(a), CYL_R * np.sin(a)], -1)
        return np.concatenate([np.c_[ring, np.full(48, CYL_H)], np.c_[ring, np.full(48, -CYL_H)]])
    n = 400  # Fibonacci sphere: silhouette box within ~0.5% of the radius
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    r = np.sqrt(1 - z * z)
    phi = i * _golden
    return SPHERE_R * np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)


def aabb_corners(x: float, y: float, shape: str) -> np.ndarray:
    """World corners [8,3] of an axis-aligned box around the object at (x, y), any yaw."""
    r = DISK[shape]
    top = 2 * CENTER_Z[shape]
    return np.array([[x + sx * r, y + sy * r, z] for sx in (-1, 1) for sy in (-1, 1) for z in (0.0, top)])


def _rect(points_px: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Integer pixel rectangle (y0, y1, x0, x1) covering projected points, clipped; None if empty."""
    x0 = max(int(math.floor(points_px[:, 0].min())) - 1, 0)
    x1 = min(int(math.ceil(points_px[:, 0].max())) + 2, width)
    y0 = max(int(math.floor(points_px[:, 1].min())) - 1, 0)
    y1 = min(int(math.ceil(points_px[:, 1].max())) + 2, height)
    return (y0, y1, x0, x1) if x0 < x1 and y0 < y1 else None


# ----------------------------------------------------------------------------------------------
# rendering


@dataclass
class Frame:
    image: np.ndarray   # [H,W,3] float in [0,1]
    obj: np.ndarray     # [H,W] int, -1 floor, else object index
    local: np.ndarray   # [H,W,3] hit point in the object's local frame (floor: world point)


class Renderer:
    """Ray casts one scene frame by frame; floor terms that never change are computed once."""

    def __init__(self, cam: Camera, scene: "Scene"):
        self.cam, self.scene = cam, scene
        self.h, self.w = cam.height, cam.width
        self.dirs = cam.rays()  # [H,W,3]
        with np.errstate(divide="ignore"):
            t_floor = -cam.pos[2] / self.dirs[..., 2]
        if not (t_floor > 0).all():
            raise ValueError("camera sees above the horizon; the renderer needs the floor to fill the view")
        self.t_floor = t_floor  # [H,W]
        self.floor_pts = cam.pos + t_floor[..., None] * self.dirs  # [H,W,3]
        ys, xs = np.mgrid[0:self.h, 0:self.w]
        self.grid = np.stack([xs.reshape(-1), ys.reshape(-1)], -1).astype(np.float64)  # [HW,2] (x, y)
        self.hulls = [_hull_points(s) for s in scene.shapes]
        self.albedo = np.array([COLORS[c] for c in scene.colors], dtype=np.float64) / 255.0  # [K,3]
        self.metal = np.array([m == "metal" for m in scene.materials])  # [K]
        # the floor never moves: its light-sample rays and Lambert terms are computed once
        self.floor_origins = self.floor_pts.reshape(-1, 3) + np.array([0.0, 0.0, 1e-4])  # [HW,3]
        to_light = LIGHT_SAMPLES[:, None, :] - self.floor_origins[None]  # [S,HW,3]
        self.floor_ldist = np.linalg.norm(to_light, axis=-1)  # [S,HW]
        self.floor_ldir = to_light / self.floor_ldist[..., None]
        self.floor_lambert = np.clip(self.floor_ldir[..., 2], 0.0, None)  # [S,HW] (normal = +z)
        self.floor_diffuse = self.floor_lambert.mean(0)  # [HW] where no object shadows the floor
        self.floor_image = (FLOOR_RGB * (AMBIENT + DIFFUSE * self.floor_diffuse[:, None])).astype(np.float32)  # [HW,3]

    def pose(self, t: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Object i's centre [3] and rotation [3,3] (local -> world) at frame t."""
        x, y = self.scene.pos[t, i]
        return np.array([x, y, CENTER_Z[self.scene.shapes[i]]]), _rot(self.scene.yaw[t, i])

    def screen_rect(self, t: int, i: int):
        x, y = self.scene.pos[t, i]
        return _rect(self.cam.project(aabb_corners(x, y, self.scene.shapes[i])), self.w, self.h)

    def shadow_rect(self, t: int, i: int):
        """Screen rectangle holding every point object i can shadow at frame t (box + its floor shadow)."""
        x, y = self.scene.pos[t, i]
        corners = aabb_corners(x, y, self.scene.shapes[i])  # [8,3]
        lz = LIGHT_SAMPLES[:, None, 2]
        s = lz / (lz - corners[None, :, 2])  # [S,8] scale to reach z=0 from each light sample
        floor = LIGHT_SAMPLES[:, None] + (corners[None] - LIGHT_SAMPLES[:, None]) * s[..., None]  # [S,8,3]
        pts = np.concatenate([corners, floor.reshape(-1, 3)])
        return _rect(self.cam.project(pts), self.w, self.h)

    def occluded(self, t: int, origins: np.ndarray, dirs: np.ndarray, dist: np.ndarray, obj: int) -> np.ndarray:
        """Whether rays [N] hit object obj at frame t before distance dist (world frame)."""
        c, r = self.pose(t, obj)
        ol = (origins - c) @ r  # world -> local is r.T, applied to row vectors as @ r
        dl = dirs @ r
        return _intersect(self.scene.shapes[obj], ol, dl) < dist

    def render(self, t: int) -> Frame:
        h, w, k = self.h, self.w, len(self.scene.shapes)
        n_s = len(LIGHT_SAMPLES)
        depth = self.t_floor.copy()
        obj = np.full((h, w), -1, dtype=np.int16)
        for i in range(k):  # primary rays, only inside each object's screen rectangle
            rect = self.screen_rect(t, i)
            if rect is None:
                continue
            y0, y1, x0, x1 = rect
            c, r = self.pose(t, i)
            d = self.dirs[y0:y1, x0:x1].reshape(-1, 3)
            hit = _intersect(self.scene.shapes[i], (self.cam.pos - c) @ r, d @ r).reshape(y1 - y0, x1 - x0)
            closer = hit < depth[y0:y1, x0:x1]
            depth[y0:y1, x0:x1][closer] = hit[closer]
            obj[y0:y1, x0:x1][closer] = i
        flat_obj = obj.reshape(-1)
        on_obj = np.flatnonzero(flat_obj >= 0)  # [n] pixels showing an object
        pts = self.cam.pos + depth.reshape(-1)[on_obj, None] * self.dirs.reshape(-1, 3)[on_obj]  # [n,3]
        nrm = np.zeros_like(pts)
        local = self.floor_pts.reshape(-1, 3).copy()
        for i in range(k):
            m = flat_obj[on_obj] == i
            if m.any():
                c, r = self.pose(t, i)
                loc = (pts[m] - c) @ r  # [m,3] local
                local[on_obj[m]] = loc
                nrm[m] = _normal(self.scene.shapes[i], loc) @ r.T
        # per light sample: ray origin, direction and distance of the object pixels; the floor's are precomputed
        # and only the pixels a shadow ray or an object touches are computed per frame
        obj_origins = pts + nrm * 1e-4  # [n,3]
        to_light = LIGHT_SAMPLES[:, None, :] - obj_origins[None]  # [S,n,3]
        obj_ldist = np.linalg.norm(to_light, axis=-1)  # [S,n]
        obj_ldir = to_light / obj_ldist[..., None]
        obj_lambert = np.clip((obj_ldir * nrm[None]).sum(-1), 0.0, None)  # [S,n]
        slot = np.full(h * w, -1)
        slot[on_obj] = np.arange(len(on_obj))  # pixel -> its row in the obj_* arrays (-1: floor)
        lit = np.ones((n_s, h * w), dtype=bool)
        for i in range(k):  # shadow rays, only where object i can cast a shadow
            rect = self.shadow_rect(t, i)
            if rect is None:
                continue
            y0, y1, x0, x1 = rect
            pix = (np.arange(y0, y1)[:, None] * w + np.arange(x0, x1)[None]).reshape(-1)
            pix = pix[flat_obj[pix] != i]  # convex: an object never shadows itself
            if not len(pix):
                continue
            rows = slot[pix]
            on = rows >= 0
            origins = self.floor_origins[pix]  # [m,3]
            origins[on] = obj_origins[rows[on]]
            ldir = self.floor_ldir[:, pix]  # [S,m,3]
            ldir[:, on] = obj_ldir[:, rows[on]]
            ldist = self.floor_ldist[:, pix]  # [S,m]
            ldist[:, on] = obj_ldist[:, rows[on]]
            c, r = self.pose(t, i)
            ol = (origins - c) @ r
            for s in range(n_s):
                if lit[s, pix].any():
                    hit = _intersect(self.scene.shapes[i], ol, ldir[s] @ r) < ldist[s]
                    lit[s, pix[hit]] = False
        shadowed = np.flatnonzero(~lit.all(0))
        diffuse = self.floor_diffuse.copy()  # [HW]
        diffuse[shadowed] = (self.floor_lambert[:, shadowed] * lit[:, shadowed]).mean(0)
        diffuse[on_obj] = (obj_lambert * lit[:, on_obj]).mean(0)
        image = self.floor_image.copy()  # [HW,3]
        image[shadowed] = (FLOOR_RGB * (AMBIENT + DIFFUSE * diffuse[shadowed, None])).astype(np.float32)
        if len(on_obj):
            image[on_obj] = self._shade_objects(flat_obj[on_obj], nrm, self.dirs.reshape(-1, 3)[on_obj],
                                                obj_ldir, diffuse[on_obj], lit[:, on_obj].mean(0))
        return Frame(np.clip(image, 0.0, 1.0).reshape(h, w, 3), obj, local.reshape(h, w, 3))

    def _shade_objects(self, ids, nrm, dirs, ldir, diffuse, shadow) -> np.ndarray:
        """Colours [n,3] of object pixels: rubber = Lambert + faint gloss; metal = highlight + reflection."""
        albedo = self.albedo[ids]  # [n,3]
        metal = self.metal[ids][:, None]  # [n,1]
        view = -dirs
        light = ldir.mean(0)
        light /= np.linalg.norm(light, axis=-1, keepdims=True)
        half = light + view
        half /= np.linalg.norm(half, axis=-1, keepdims=True)
        n_h = np.clip((nrm * half).sum(-1), 0.0, 1.0)
        refl_z = (2 * (nrm * view).sum(-1) * nrm[:, 2] - view[:, 2])[:, None]  # reflected ray's z
        env = np.where(refl_z > 0, 0.55 + 0.35 * refl_z, FLOOR_RGB * (1.0 + 0.4 * refl_z))
        rubber = albedo * (AMBIENT + DIFFUSE * diffuse[:, None]) + 0.06 * (n_h ** 12 * shadow)[:, None]
        shiny = (albedo * (0.22 + 0.45 * diffuse[:, None]) + 0.35 * albedo * env
                 + (0.9 * n_h ** 60 * shadow)[:, None] * (0.5 + 0.5 * albedo))
        return np.where(metal, shiny, rubber)

    def flow_and_vis(self, frame: Frame, t_other: int) -> tuple[np.ndarray, np.ndarray]:
        """Flow [2,H,W] from `frame`'s grid to frame t_other, and visibility [H,W] of its points there.

        Each object pixel's surface point (kept in the object's local frame) is moved to its pose at
        t_other and projected; floor pixels have zero flow. A point is visible at t_other when it
        projects inside the image and the camera ray to it meets no object (itself included) first.
        """
        h, w = self.h, self.w
        flat_obj = frame.obj.reshape(-1)
        on_obj = np.flatnonzero(flat_obj >= 0)
        local = frame.local.reshape(-1, 3)[on_obj]
        world = np.empty_like(local)  # [n,3] object points at t_other
        for i in range(len(self.scene.shapes)):
            m = flat_obj[on_obj] == i
            if m.any():
                c, r = self.pose(t_other, i)
                world[m] = local[m] @ r.T + c
        flow = np.zeros((h * w, 2))
        flow[on_obj] = self.cam.project(world) - self.grid[on_obj]  # floor: exactly zero (static camera)
        q = self.grid + flow  # [HW,2] where each point is at t_other
        vis = (q[:, 0] >= 0) & (q[:, 0] <= w - 1) & (q[:, 1] >= 0) & (q[:, 1] <= h - 1)
        ray = self.dirs.reshape(-1, 3).copy()  # floor points: the pixel's own (static) ray
        dist = self.t_floor.reshape(-1).copy()
        to_pt = world - self.cam.pos
        dist[on_obj] = np.linalg.norm(to_pt, axis=-1)
        ray[on_obj] = to_pt / dist[on_obj, None]
        for i in range(len(self.scene.shapes)):
            rect = self.screen_rect(t_other, i)
            if rect is None:
                continue
            y0, y1, x0, x1 = rect
            cand = np.flatnonzero(vis & (q[:, 0] >= x0 - 1) & (q[:, 0] <= x1) & (q[:, 1] >= y0 - 1) & (q[:, 1] <= y1))
            if len(cand):
                blocked = self.occluded(t_other, self.cam.pos, ray[cand], dist[cand] - 1e-3, i)
                vis[cand[blocked]] = False
        return flow.T.reshape(2, h, w), vis.reshape(h, w)

    def boxes(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised xyxy boxes [K,4] of every object at frame t and in-view mask [K]."""
        k = len(self.scene.shapes)
        boxes = np.zeros((k, 4), dtype=np.float32)
        mask = np.zeros(k, dtype=np.uint8)
        for i in range(k):
            c, r = self.pose(t, i)
            px = self.cam.project(self.hulls[i] @ r.T + c)
            x0, y0 = (px.min(0) + 0.5) / (self.w, self.h)
            x1, y1 = (px.max(0) + 0.5) / (self.w, self.h)
            box = np.clip([x0, y0, x1, y1], 0.0, 1.0)
            boxes[i] = box
            mask[i] = box[2] > box[0] and box[3] > box[1]
        return boxes, mask
