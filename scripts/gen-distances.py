#!/usr/bin/env python3
"""Generates node/data/min-distance-km.csv: for each pair of jurisdictions
(ISO 3166-1 alpha-2), a lower bound on the great-circle distance between
their territories, in km. Ferry turns it into the smallest round trip a
landmark in one can measure to a node in the other (light in fibre covers
about 100 km per millisecond of round trip).

Source: Natural Earth's 1:110m admin-0 countries (public domain), as the
`naturalearth_lowres` dataset that geopandas 0.14 ships in its wheel. Only
the data files are read (with pyshp), so geopandas' own dependencies are not
needed:

    python3 -m pip install --no-deps geopandas==0.14.4
    python3 -m pip install pyshp==2.3.1 pycountry==24.6.1 numpy
    python3 scripts/gen-distances.py > node/data/min-distance-km.csv

The bound is conservative, so a claim is never refuted by the data's
coarseness:
- every border and coast is densified to points at most 50 km apart, so the
  true distance is at most 25 + 25 km less than the nearest pair of points;
- a further 50 km covers the 1:110m simplification;
- territories that touch or overlap are 0 apart, and so is any pair within
  the margins; only pairs further apart than 0 are written.
Jurisdictions missing from the 1:110m data (microstates such as SG, MT, BH)
have no row: nothing is refuted for them.
"""

import importlib.util
import math
import os
import sys

import numpy as np
import pycountry
import shapefile

STEP_KM = 50.0
SIMPLIFICATION_KM = 50.0
EARTH_KM = 6371.0088


def dataset():
    spec = importlib.util.find_spec("geopandas")
    if spec is None:
        sys.exit("pip install --no-deps geopandas==0.14.4 (it ships the data)")
    base = os.path.join(os.path.dirname(spec.origin), "datasets", "naturalearth_lowres")
    return shapefile.Reader(os.path.join(base, "naturalearth_lowres"), encoding="latin-1")


def unit(lon, lat):
    lon, lat = math.radians(lon), math.radians(lat)
    return (math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat))


def densify(ring):
    """Points along a ring (lon/lat) at most STEP_KM apart, as unit vectors."""
    out = []
    for (a, b) in zip(ring, ring[1:]):
        pa, pb = np.array(unit(*a)), np.array(unit(*b))
        angle = math.acos(max(-1.0, min(1.0, float(pa @ pb))))
        n = max(1, math.ceil(angle * EARTH_KM / STEP_KM))
        for i in range(n):
            t = i / n
            if angle < 1e-12:
                p = pa
            else:
                p = (math.sin((1 - t) * angle) * pa + math.sin(t * angle) * pb) / math.sin(angle)
            out.append(p)
    return out


def main():
    shapes = dataset()
    points = {}
    for rec, shp in zip(shapes.records(), shapes.shapes()):
        a3 = rec["iso_a3"]
        country = pycountry.countries.get(alpha_3=a3)
        if country is None:
            print(f"skipping {rec['name']} ({a3}): no ISO code", file=sys.stderr)
            continue
        parts = list(shp.parts) + [len(shp.points)]
        pts = []
        for s, e in zip(parts, parts[1:]):
            pts.extend(densify(shp.points[s:e]))
        points.setdefault(country.alpha_2, []).extend(pts)
    codes = sorted(points)
    arrays = {c: np.array(points[c]) for c in codes}
    print("a,b,km")
    margin = STEP_KM + SIMPLIFICATION_KM
    for i, a in enumerate(codes):
        for b in codes[i + 1:]:
            # Chord length to angle to km; the nearest pair of points.
            dots = arrays[a] @ arrays[b].T
            angle = math.acos(max(-1.0, min(1.0, float(dots.max()))))
            km = angle * EARTH_KM - margin
            if km > 0:
                print(f"{a},{b},{int(km)}")


if __name__ == "__main__":
    main()
