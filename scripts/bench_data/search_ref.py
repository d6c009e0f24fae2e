"""The search-core benchmark's problems through pycma and pymoo (the references of
`scripts/bench-search`). One JSON line per problem, the same fields `bench_search --json` prints:
CMA-ES rows `{"suite": "cmaes", "problem", "n", "median_evals", "solved", "runs"}`, multi-objective
rows `{"suite": "moo", "problem", "n", "evals", "median_hv", "runs"}`.

CMA-ES: x0 = 3·1, sigma0 = 2, bounds [-5, 5] per gene (pycma's default BoundTransform; the box
evomerge reflects in), evaluations until the first f <= 1e-8 (counted call by call), pycma's
default settings otherwise (active CMA, its own stopping rules); Rastrigin through `cma.fmin2`
with at most 9 IPOP restarts (population doubled each time). NSGA-II / NSGA-III: pymoo's
defaults (SBX eta 15, polynomial mutation eta 20), population 100 (NSGA-III: Das-Dennis
directions with 12 partitions, 91 of them, population 92), hypervolume w.r.t. 1.1 per objective
of the final non-dominated set, computed by pymoo.

    python scripts/bench_data/search_ref.py --seeds 10 [--only sphere,ellipsoid] [--jobs 2]
"""

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys

import numpy as np

TARGET = 1e-8


def sphere(x):
    return float(np.dot(x, x))


def ellipsoid(x):
    n = len(x)
    w = 10.0 ** (6.0 * np.arange(n) / max(n - 1, 1))
    return float(np.dot(w, x * x))


def rosenbrock(x):
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def rastrigin(x):
    return float(10.0 * len(x) + np.sum(x * x - 10.0 * np.cos(2.0 * math.pi * x)))


FUNCS = {"sphere": sphere, "ellipsoid": ellipsoid, "rosenbrock": rosenbrock, "rastrigin": rastrigin}

# (problem, n, separable, IPOP restarts): the rows of bench_search
CMAES_ROWS = [
    ("sphere", 10, False, 0),
    ("ellipsoid", 10, False, 0),
    ("rosenbrock", 10, False, 0),
    ("rastrigin", 10, False, 9),
    ("sphere", 40, False, 0),
    ("ellipsoid", 40, False, 0),
    ("rosenbrock", 40, False, 0),
    ("rastrigin", 40, False, 9),
    ("ellipsoid", 200, True, 0),
]


class Hit(Exception):
    pass


def cma_run(args):
    name, n, separable, restarts, seed = args
    import cma

    f = FUNCS[name]
    count = [0]

    def counted(x):
        count[0] += 1
        v = f(np.asarray(x))
        if v <= TARGET:
            raise Hit()
        return v

    opts = {
        "seed": seed + 1,  # pycma: seed 0 means "from the clock"
        "bounds": [-5.0, 5.0],
        "verbose": -9,
        "maxfevals": 5_000_000,
        "CMA_diagonal": separable,
    }
    try:
        if restarts:
            cma.fmin2(counted, n * [3.0], 2.0, opts, restarts=restarts, incpopsize=2)
        else:
            es = cma.CMAEvolutionStrategy(n * [3.0], 2.0, opts)
            while not es.stop():
                xs = es.ask()
                es.tell(xs, [counted(x) for x in xs])
    except Hit:
        return count[0]
    return None


def moo_run(args):
    problem, n, m, evals, seed = args
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.indicators.hv import HV
    from pymoo.optimize import minimize
    from pymoo.problems import get_problem
    from pymoo.util.ref_dirs import get_reference_directions

    if m == 3:
        ref_dirs = get_reference_directions("das-dennis", 3, n_partitions=12)
        algorithm = NSGA3(ref_dirs=ref_dirs, pop_size=92)
        p = get_problem(problem, n_var=n, n_obj=3)
        pop = 92
    else:
        algorithm = NSGA2(pop_size=100)
        p = get_problem(problem, n_var=n)
        pop = 100
    res = minimize(p, algorithm, ("n_gen", evals // pop), seed=seed + 1, verbose=False)
    return float(HV(ref_point=np.full(m, 1.1))(res.F))


MOO_ROWS = [("zdt1", 30, 2, 25_000), ("zdt2", 30, 2, 25_000), ("zdt3", 30, 2, 25_000), ("dtlz2", 12, 3, 40_000)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated problem names (default: all)")
    ap.add_argument("--jobs", type=int, default=mp.cpu_count())
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    with mp.Pool(a.jobs) as pool:
        for name, n, sep, restarts in CMAES_ROWS:
            if only and name not in only:
                continue
            runs = pool.map(cma_run, [(name, n, sep, restarts, s) for s in range(a.seeds)])
            solved = sorted(r for r in runs if r is not None)
            median = statistics.median(solved) if solved else None
            print(json.dumps({"suite": "cmaes", "problem": name, "n": n, "separable": sep, "median_evals": median,
                              "solved": len(solved), "runs": a.seeds}), flush=True)
        for problem, n, m, evals in MOO_ROWS:
            if only and problem not in only:
                continue
            hv = sorted(pool.map(moo_run, [(problem, n, m, evals, s) for s in range(a.seeds)]))
            print(json.dumps({"suite": "moo", "problem": problem, "n": n, "evals": evals,
                              "median_hv": statistics.median(hv), "runs": a.seeds}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
