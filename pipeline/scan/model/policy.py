"""What a model scan allows: the pickle globals policy with its allowlist profiles, and the limits
that bound every archive, stream and header a hostile file can make the scanner read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.errors import InputError
from pipeline.scan.model.report import Severity, names

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class ScanLimits:
    """Caps on what one scan reads; exceeding one is a finding naming the cap, never a pass.

    Defaults sit well above real checkpoints (a 70B-parameter shard is ~10 GiB, a Keras config a
    few MiB) and far below what a bomb claims.
    """

    member_bytes: int = 32 * GIB  # one archive member, uncompressed
    total_bytes: int = 256 * GIB  # all members of one archive, uncompressed
    ratio: int = 200  # uncompressed / compressed size of a compressed member or stream
    ratio_floor: int = 16 * MIB  # members expanding to less than this are never called bombs
    members: int = 200_000  # entries in one archive
    nesting: int = 4  # archive in archive in ...: deeper than any real model format
    document_bytes: int = 64 * MIB  # a JSON config or header, which must be parsed whole
    protobuf_bytes: int = 2 * GIB  # a SavedModel or ONNX protobuf (protobuf's own ceiling)
    decompressed_bytes: int = 64 * GIB  # one compressed stream (joblib zlib/gzip/bz2/xz)
    parse_seconds: int = 120  # one file handed to a C parser (h5py) before it is abandoned

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise InputError(
                    f"scan limit {name}={value!r} must be a positive integer",
                    hint="raise a limit to accept bigger models, never set it to zero",
                )


# --- Pickle globals -------------------------------------------------------------------------------

# Always allowed: constructors that rebuild plain Python data and NumPy arrays (joblib's array
# wrapper included: every joblib file has it). Anything else needs a profile or is a finding.
BASE_GLOBALS = names(
    """
    collections.OrderedDict collections.defaultdict collections.deque
    copyreg._reconstructor copy_reg._reconstructor _codecs.encode
    builtins.object builtins.set builtins.frozenset builtins.slice builtins.complex
    builtins.bytearray builtins.bytes builtins.range builtins.int builtins.float builtins.str
    builtins.bool builtins.tuple builtins.list builtins.dict
    __builtin__.object __builtin__.set __builtin__.frozenset __builtin__.slice
    __builtin__.complex __builtin__.bytearray
    datetime.datetime datetime.date datetime.time datetime.timedelta decimal.Decimal
    numpy.ndarray numpy.dtype
    numpy.core.multiarray._reconstruct numpy._core.multiarray._reconstruct
    numpy.core.multiarray.scalar numpy._core.multiarray.scalar
    numpy.core.numeric._frombuffer numpy._core.numeric._frombuffer
    numpy.random._pickle.__randomstate_ctor numpy.random._pickle.__generator_ctor
    numpy.random._pickle.__bit_generator_ctor numpy.random.mtrand.RandomState
    numpy.random._mt19937.MT19937 numpy.random._pcg64.PCG64 numpy.random._philox.Philox
    numpy.random._sfc64.SFC64
    joblib.numpy_pickle.NumpyArrayWrapper
    """
)
# (_codecs.encode: protocol 2 spells bytes as _codecs.encode(str, 'latin1').)

# torch.save's tensor and storage rebuilders: data, never code.
TORCH_GLOBALS = names(
    """
    torch._utils._rebuild_tensor torch._utils._rebuild_tensor_v2 torch._utils._rebuild_tensor_v3
    torch._utils._rebuild_parameter torch._utils._rebuild_parameter_with_state
    torch._utils._rebuild_qtensor torch._utils._rebuild_sparse_tensor
    torch._tensor._rebuild_from_type_v2 torch.nn.parameter.Parameter
    torch.Size torch.device torch.strided torch.sparse_coo torch.per_tensor_affine
    torch.FloatStorage torch.DoubleStorage torch.HalfStorage torch.BFloat16Storage
    torch.LongStorage torch.IntStorage torch.ShortStorage torch.CharStorage torch.ByteStorage
    torch.BoolStorage torch.ComplexFloatStorage torch.ComplexDoubleStorage torch.UntypedStorage
    torch.float32 torch.float64 torch.float16 torch.bfloat16 torch.int64 torch.int32
    torch.int16 torch.int8 torch.uint8 torch.bool torch.complex64 torch.complex128
    """
)

# scikit-learn estimators are classes whose state is plain arrays; SciPy sparse matrices hold
# their fitted coefficients. Functions and helper modules stay findings (see judge_sklearn).
SKLEARN_GLOBALS = names(
    """
    sklearn.tree._tree.Tree sklearn.utils._bunch.Bunch
    scipy.sparse._csr.csr_matrix scipy.sparse._csc.csc_matrix scipy.sparse._coo.coo_matrix
    scipy.sparse.csr.csr_matrix scipy.sparse.csc.csc_matrix scipy.sparse.coo.coo_matrix
    scipy.sparse._csr.csr_array scipy.sparse._csc.csc_array
    """
)
# Modules inside sklearn that download, load or exist for tests: never allowed by the profile.
_SKLEARN_EXCLUDED = ("sklearn.datasets", "sklearn.externals", "sklearn.utils._testing")


def _sklearn_allows(full: str) -> bool:
    """A class (CapitalisedName) in an sklearn module, outside the excluded helpers."""
    if full in SKLEARN_GLOBALS:
        return True
    module, _, attr = full.rpartition(".")
    return (
        module.startswith("sklearn.")
        and not module.startswith(_SKLEARN_EXCLUDED)
        and attr[:1].isupper()
        and attr.isidentifier()
    )


PROFILES: dict[str, str] = {
    "numpy": "Python containers and NumPy arrays (always on)",
    "torch": "torch.save tensors, storages, dtypes and parameters (on by default)",
    "sklearn": "scikit-learn estimator classes and SciPy sparse matrices (off by default)",
}
DEFAULT_PROFILES = ("numpy", "torch")

# Dotted prefixes that run code, touch files, processes or the network, or load more pickles.
# Matched against "module.qualname", so "os" also covers "os.path.join"; on Linux os.system
# pickles as "posix.system". No profile overrides these.
_PROCESS = """os posix nt subprocess pty commands popen2 platform.popen"""
_CODE = """
    runpy importlib imp code codeop timeit pdb bdb trace profile cProfile doctest pydoc ctypes
    _ctypes marshal types pip ensurepip venv distutils setuptools numpy.testing numpy.f2py
    numpy.distutils torch._inductor torch.utils.cpp_extension signal threading _thread
    multiprocessing asyncio concurrent
"""
_LOADERS = """
    pickle _pickle cPickle dill cloudpickle shelve joblib.load numpy.load torch.load
    torch.serialization torch.jit torch.hub keras.models.load_model tensorflow
"""
_NETWORK = """
    socket _socket ssl http httplib urllib urllib2 urllib3 requests aiohttp ftplib smtplib
    telnetlib xmlrpc webbrowser paramiko
"""
_FILES = """shutil io _io tempfile pathlib glob fileinput codecs.open zipfile tarfile sys"""
_BUILTINS = " ".join(
    f"{mod}.{fn}"
    for mod in ("builtins", "__builtin__")
    for fn in sorted(
        names(
            "eval exec execfile compile open file __import__ getattr setattr delattr globals "
            "locals vars breakpoint input apply reload help exit quit"
        )
    )
)
_GADGETS = (
    """operator.attrgetter operator.methodcaller _operator.attrgetter _operator.methodcaller"""
)

DANGEROUS_GLOBALS: dict[str, str] = {
    **dict.fromkeys(names(_PROCESS), "runs processes or touches the filesystem"),
    **dict.fromkeys(names(_CODE), "imports or executes Python code"),
    **dict.fromkeys(names(_LOADERS), "loads another (unscanned) model or pickle"),
    **dict.fromkeys(names(_NETWORK), "opens network connections"),
    **dict.fromkeys(names(_FILES), "reads or writes files or interpreter state"),
    **dict.fromkeys(names(_BUILTINS), "a builtin that runs code or reaches any attribute"),
    **dict.fromkeys(names(_GADGETS), "calls an arbitrary attribute or method (a gadget)"),
}
# Kept for callers of the pre-profile API: the default allowlist as one set.
SAFE_GLOBALS = BASE_GLOBALS | TORCH_GLOBALS


def parse_profiles(chosen: Iterable[str]) -> frozenset[str]:
    """Validate profile names; numpy is always included."""
    picked = {p.strip().lower() for p in chosen}
    unknown = sorted(picked - set(PROFILES))
    if unknown:
        raise InputError(
            f"unknown allowlist profile(s): {', '.join(unknown)}",
            hint=f"choose from {', '.join(PROFILES)}",
        )
    return frozenset(picked | {"numpy"})


def dangerous_global(full: str) -> str | None:
    for prefix, why in DANGEROUS_GLOBALS.items():
        if full == prefix or full.startswith(prefix + "."):
            return why
    return None


def judge_global(
    module: str, name: str, profiles: Iterable[str] = DEFAULT_PROFILES
) -> tuple[Severity, str] | None:
    """None for an allowlisted constructor; otherwise the severity and why."""
    full = f"{module}.{name}"
    why = dangerous_global(full)
    if why is not None:
        return Severity.CRITICAL, why
    chosen = set(profiles)
    if full in BASE_GLOBALS or ("torch" in chosen and full in TORCH_GLOBALS):
        return None
    if "sklearn" in chosen and _sklearn_allows(full):
        return None
    hint = ""
    if module.split(".")[0] in ("sklearn", "scipy") and "sklearn" not in chosen:
        hint = " (expected for scikit-learn models: allow the sklearn profile)"
    elif module.split(".")[0] == "torch" and "torch" not in chosen:
        hint = " (expected for PyTorch checkpoints: allow the torch profile)"
    return (
        Severity.HIGH,
        f"not an allowlisted data constructor; loading would import and call it{hint}",
    )


@dataclass(frozen=True)
class ScanPolicy:
    """Which allowlist profiles apply and which limits bound the scan."""

    profiles: frozenset[str] = field(default_factory=lambda: parse_profiles(DEFAULT_PROFILES))
    limits: ScanLimits = field(default_factory=ScanLimits)

    @classmethod
    def of(
        cls, profiles: Iterable[str] | None = None, limits: ScanLimits | None = None
    ) -> ScanPolicy:
        return cls(
            parse_profiles(DEFAULT_PROFILES if profiles is None else profiles),
            limits or ScanLimits(),
        )
