"""Distances between two sets of image features (N, D), in float64, with the field's standard definitions.

FID   Fréchet distance between Gaussians fitted to Inception pool3 features (Heusel et al. 2017).
KID   unbiased MMD² with the cubic polynomial kernel (x·y/D + 1)³, averaged over random subsets
      (Bińkowski et al. 2018; torch-fidelity's defaults: 100 subsets of 1000).
CMMD  MMD with a Gaussian RBF kernel, sigma 10, times 1000, on L2-normalised CLIP embeddings (Jayasumana et
      al. 2024). Like the paper's reference code, it uses the minimum-variance estimator (kernel means over all
      pairs, Gretton et al. 2012 eq. 5): it is exactly 0 for identical sets, and differs from the unbiased
      estimate by O(1/N) (Gretton et al., Lemma 6). DINO-MMD is the same on L2-normalised DINOv2 features.
"""

import numpy as np

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
KERNEL_ROWS = 1024


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues below rounding noise (numpy's matrix-rank tolerance) set to 0: a square root would
    otherwise amplify noise of 1e-16 into 1e-8 per null direction, e.g. for fewer samples than dimensions."""
    tolerance = eigenvalues.max(initial=0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(_psd_eigenvalues(eigenvalues))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½). tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½), a symmetric PSD matrix
    whose eigenvalues are real: no complex square root to clean up, even for singular covariances."""
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """With fewer samples than dimensions, S = AᵀA (A: centred features / √(n-1)) and tr((S1 S2)^½) is the sum
    of the singular values of A1 A2ᵀ: an n1 x n2 SVD replaces the D x D eigen-decompositions (exact, and faster)."""
    x, y = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    if max(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    a = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(axis=0)) / np.sqrt(len(y) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = x.mean(axis=0) - y.mean(axis=0)
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1) ** 3


def unbiased_mmd2(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """U-statistic within each set (no self-pairs), mean over all cross pairs."""
    m, n = len(k_xx), len(k_yy)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kid(
    features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation of unbiased polynomial-kernel MMD² over random subsets (drawn without
    replacement; subsets shrink to the smaller set when it has fewer than subset_size features)."""
    x, y = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least two features in each set")
    if size == len(x) == len(y):  # every subset is then the whole of both sets, in some order: one value
        subsets = 1
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        xs = x[rng.choice(len(x), size, replace=False)]
        ys = y[rng.choice(len(y), size, replace=False)]
        values.append(unbiased_mmd2(polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys)))
    return float(np.mean(values)), float(np.std(values))


def rbf_mmd(
    features1: np.ndarray, features2: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE
) -> float:
    """CMMD's estimator: scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k = exp(-|a - b|² / 2 sigma²)."""
    x, y = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    gamma = 1 / (2 * sigma**2)

    def mean_kernel(a: np.ndarray, b: np.ndarray) -> float:
        total = 0.0
        for start in range(0, len(a), KERNEL_ROWS):  # row blocks: 10k x 10k float64 would need 800 MB
            rows = a[start : start + KERNEL_ROWS]
            squared = (rows * rows).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * rows @ b.T
            total += np.exp(-gamma * np.clip(squared, 0, None)).sum()
        return total / (len(a) * len(b))

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))
