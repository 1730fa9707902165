"""Synthetic machines, faults, factory rooms and microphone arrays (`signalcraft simulate`).

Three uses: the demo's input, test fixtures with exact labels, and training data for the
Demucs separator (one source per machine type). Everything is seeded: the same scene and
seed give bit-identical audio on the same platform.

Physics, kept simple but grounded:

- Machines are sums of tones locked to an integrated shaft phase (the rotation rate
  drifts by a few percent as a smooth random walk, so harmonics and vane/blade passing
  move together) plus shaped noise, all under a slow load modulation. A pump has shaft
  harmonics, a vane-pass tone with shaft-rate sidebands and shaft-modulated flow noise;
  a fan a blade-pass tone and low-passed turbulence; an induction motor a hum at twice
  the mains frequency, rotor-slot harmonics at slots x rotation +- 2 x mains and windage;
  a valve open/close thumps and clicks (decaying resonances) and flow hiss while open.
- Faults are added to the healthy sound inside their time window (with 50 ms ramps)
  and change it the way the fault does: imbalance raises the 1x shaft tone by 15-20 dB;
  a bearing defect adds impacts at ~3.5x shaft rate, each ringing a 2-4 kHz structural
  resonance; cavitation adds random high-frequency crackle; looseness adds shaft
  harmonics to 20x, half-order subharmonics and clipped rubbing once per revolution; a
  leak adds a steady 4-7 kHz hiss.
- Every point source reaches every microphone with its propagation delay (distance /
  343 m/s, fractional, applied as an FFT phase shift) and 1/r attenuation (clamped at
  0.25 m). Optional reverberation adds, per source and microphone, an exponentially
  decaying noise tail with the given RT60 at the level a room of ``ROOM_VOLUME_M3``
  has (Sabine's critical distance), so far machines sound more reverberant.
- The factory background: pink-to-brown diffuse noise (independent per microphone)
  with a slowly varying level, a distant unrelated machine (low tones and low-passed
  noise, 12-25 m away) and occasional knocks, clanks and forklift reversing beeps at
  random places around mic 0, all propagated like the machines.
- An intermittent noise source (``IntermittentNoise``, optional): a ventilation fan or
  a compressor next door that switches on and off by itself (random spells, exponential
  or uniform durations, 50 ms fades like the faults'). While on, its level walks slowly
  within a few dB; it has a blade-pass/motor tone (90-250 Hz) with two harmonics whose
  frequency wanders by a few percent, and broadband noise whose spectral tilt (the
  balance of a 40-600 Hz rumble and a 0.4-5 kHz hiss) walks slowly; its rare peaks above
  3x its RMS are bent to stay under 4x. A noise clip recorded with it off cannot
  describe it; a reference microphone next to it (``Scene.references``) can. It reaches
  every microphone and every reference microphone like a machine (delay, 1/r, reverb).
- Reference microphones (``Scene.references``) record what the machine microphones
  do at their own places: the machines, the background (with their own diffuse noise)
  and the intermittent source. They are meant to stand next to the intermittent source,
  far from the machines, for a reference noise canceller to subtract from every machine
  microphone what it can predict from them.

Units and recordings: a scene's ``seed`` draws everything, so each seed is another
installation with other machines. ``unit`` separates the two: it seeds what stays the
same between recordings of one installation (each machine's design and operating
point, the room's reverberation, the distant machine's place and speed, the intermittent
source's tone), and ``seed`` then draws only one recording of it: the speed and load
walks, the phases and noise of every sound, the background's level walk and events, the
faults' severity, the intermittent source's spells and drifts. Recordings
of one unit (same ``unit``, other seeds) are what a detector calibrated on one installed
machine sees over time. ``unit=None`` is ``unit=seed``: the audio of a seed is the same
with and without it.

Levels are fixed, never normalised per clip, so a fault that makes a machine louder
makes the recording louder: a healthy machine has an RMS of ``MACHINE_RMS`` (-30.5 dBFS)
at 1 m at ``gain_db = 0``, and the background is scaled once so that the power of the
machines *running normally* over that of the background at microphone 0 is ``snr_db``
(so a faulty twin of a scene shares its background exactly; the intermittent source
does not count in it). The intermittent source's level is stated the same way, relative
to ``MACHINE_RMS`` at 1 m. Only if a mixture or a reference microphone would peak above
``PEAK_LIMIT`` is the whole scene (stems, background, intermittent source and
references alike) turned down, and labels.json records by how much.

Everything new draws from its own streams: a scene without an intermittent source and
without reference microphones renders exactly as it did before they existed, and a
scene with the intermittent source differs from its twin without it (same seed) only by
the intermittent source (``Rendering.intermittent``), as long as neither was turned down.

Files (``write_rendering``), all WAV 32-bit float (soundfile subtype FLOAT, full scale
1.0, lossless for the float32 arrays)::

    OUT/mixture.wav              (frames, mics + references): what the microphones
                                 record, the reference microphones' columns last
    OUT/stems/<machine>.wav      (frames, mics): each machine alone as it arrives at the mics
    OUT/stems/_background.wav    (frames, mics): the room alone
    OUT/stems/_intermittent.wav  (frames, mics): the intermittent source alone (if any)
    OUT/labels.json              written last; the machine microphones' columns of the
                                 mixture == sum of stems + background (+ intermittent)

labels.json ``channels`` names the 1-based columns of mixture.wav: ``mics`` (the
machine microphones, for ``capture.channels``) and ``references`` (for
``capture.reference_channels``).

Separator training data (``write_training_set``), for ``train-separator DATA_DIR``::

    DATA_DIR/pump/*.wav        one machine of that type running alone, mono
    DATA_DIR/fan/*.wav         (the folder name is the source name: one source per type)
    DATA_DIR/motor/*.wav
    DATA_DIR/valve/*.wav
    DATA_DIR/_noise/*.wav      the room with the machines off, mono
    DATA_DIR/simulated-seed<S>.json   what was simulated: per clip its seed, distance,
                                      gain, speed, reverb, faults (not audio)

Folders starting with ``_`` are not sources. Real recordings go into the same folders:
mono WAV at the separator's sample rate, one machine running alone (a close microphone,
the other machines off), and room recordings with everything off into ``_noise/``.
Simulated clips are named ``sim-<seed>-<index>[-<fault>].wav``, so a run with another
seed adds clips beside the earlier ones and never replaces a real recording.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import __version__
from .errors import ConfigError
from .files import atomic_write, storage_error, write_json

log = logging.getLogger(__name__)

# --- What can be simulated -------------------------------------------------------------
MACHINE_TYPES = ("pump", "fan", "motor", "valve")
ROTATING = ("pump", "fan", "motor")
# Fault kind -> machine types it can happen to.
FAULTS: dict[str, tuple[str, ...]] = {
    "imbalance": ROTATING,
    "bearing": ROTATING,
    "looseness": ROTATING,  # looseness and rubbing: high orders, half orders, clipped impacts
    "cavitation": ("pump",),
    "leak": ("valve",),
}
BACKGROUND = "_background"  # stem name of the room; machine names may not start with "_"
NOISE_DIR = "_noise"  # training-set folder of background clips
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # machine names become file names

# --- Scene defaults --------------------------------------------------------------------
DEFAULT_MACHINES = ("pump", "fan")
DEFAULT_MICS = 4
DEFAULT_SECONDS = 10.0  # s
DEFAULT_SAMPLE_RATE = 16000  # Hz
DEFAULT_SNR_DB = 0.0  # dB, machines (normal operation) over background at mic 0
DEFAULT_LINE_HZ = 50.0  # Hz, mains frequency
MIN_SAMPLE_RATE = 8000  # Hz; bearing resonances need a few kHz of bandwidth
MIC_SPACING_M = 1.0  # default layout: microphones on a line along x, m
MIC_HEIGHT_M = 1.5  # m
MACHINE_SPACING_M = 2.0  # default layout: machines along x, alternating sides, m
MACHINE_SIDE_M = 1.5  # distance of the machine row from the microphone line, m
# Array training clips: a machine recorded again where it stands is within this of its
# place (each axis), m. Where each machine stands is what an array separator learns
# (dsp.spatial): in bench_separation's room, clips scattered over 5 cm instead of 2 cm
# cost its spatial filter 2 dB, over 10 cm 5 dB.
ARRAY_JITTER_M = 0.02
MACHINE_HEIGHT_M = 0.5  # acoustic centre of a floor-mounted machine, m

# --- Levels ----------------------------------------------------------------------------
# Headroom: three machines with a background 6 dB above them (MIMII's -6 dB) and a
# clank nearby stay below PEAK_LIMIT.
MACHINE_RMS = 0.03  # healthy machine at 1 m, gain_db 0 (-30.5 dBFS); full scale = 1.0
BACKGROUND_RMS = 0.006  # diffuse room noise per mic at its nominal level (snr_db None)
DISTANT_MACHINE_RMS = 0.07  # the unrelated distant machine, at 1 m from it
PEAK_LIMIT = 0.5  # mixtures are turned down (whole scene, recorded) only above this peak
LABELS_FORMAT = 2  # labels.json; 2: mixture.wav may end in reference columns ("channels")
MAX_ABS_GAIN_DB = 40.0  # |Machine.gain_db| beyond this is a typo, not a machine

# --- Propagation -----------------------------------------------------------------------
SPEED_OF_SOUND = 343.0  # m/s, air at 20 degC
REFERENCE_DISTANCE_M = 1.0  # source levels are stated at this distance, m
NEAR_FIELD_M = 0.25  # 1/r is clamped here: closer, a machine is no point source, m
# Sound synthesised before t = 0 so the microphones hear a machine that was already
# running, whatever its distance; it bounds the distance of a source.
PRE_ROLL_S = 0.5  # s
MAX_DISTANCE_M = 150.0  # m
MAX_RT60_S = 3.0  # s
# Longest scene or clip, s: rendering 120 s of the default 4-microphone scene peaks at
# about 0.5 GB, so ten minutes take about 2.5 GB; much longer would exhaust the memory
# of a plant PC.
MAX_SECONDS = 600.0
ROOM_VOLUME_M3 = 2000.0  # plant room, sets the reverberant level relative to the direct sound
REVERB_PREDELAY_S = 0.005  # first reflection after the direct sound, s
FFT_MARGIN = 64  # samples of zero padding for the tails of fractional-delay kernels
assert MAX_DISTANCE_M / SPEED_OF_SOUND + REVERB_PREDELAY_S < PRE_ROLL_S, "pre-roll too short for MAX_DISTANCE_M"

# --- Operating variation ---------------------------------------------------------------
CONTROL_RATE_HZ = 50.0  # rate of the slow random walks, interpolated to audio rate
SPEED_DRIFT = {"pump": 0.015, "fan": 0.015, "motor": 0.003, "valve": 0.0}  # std, fraction
SPEED_DRIFT_TAU_S = 4.0  # s, correlation time of the speed walk
LOAD_STD_DB = 1.0  # dB, slow load (amplitude) modulation
LOAD_TAU_S = 5.0  # s
MAX_DRIFT_STD = 3.0  # random walks are clipped at this many standard deviations
MOTOR_POLE_PAIRS = 2  # 4-pole induction motor: synchronous speed = mains / 2
FAULT_RAMP_S = 0.05  # s, raised-cosine fade in and out of a fault window
CAVITATION_CREST = 6.0  # cavitation bursts are soft-limited at this many times their RMS
TONE_LIMIT = 0.45  # components above this fraction of the sample rate are left out
# Amplitude of the healthy 1x shaft tone, in units of MACHINE_RMS (imbalance raises it).
ONE_X = {"pump": 0.25, "fan": 0.12, "motor": 0.15, "valve": 0.0}

# --- Background ------------------------------------------------------------------------
BACKGROUND_LEVEL_STD_DB = 2.0  # dB, slow variation of the diffuse noise level
BACKGROUND_LEVEL_TAU_S = 4.0  # s
EVENT_RATE_HZ = 0.2  # knocks, clanks and beeps per second (Poisson)
EVENT_KINDS = ("knock", "clank", "beep")
EVENT_PROBABILITY = (0.4, 0.35, 0.25)
EVENT_PEAK = {"knock": 0.3, "clank": 0.2, "beep": 0.12}  # at 1 m, full scale = 1.0

# --- Intermittent noise source and reference microphones ------------------------------
INTERMITTENT = "_intermittent"  # its stem name (stems/_intermittent.wav) and stream key
INTERMITTENT_LEVEL_DB = 3.0  # dB re MACHINE_RMS at 1 m: louder than a machine, a real nuisance
INTERMITTENT_MEAN_ON_S = 4.0  # s, mean length of a spell on
INTERMITTENT_MEAN_OFF_S = 3.0  # s, mean length of a spell off
INTERMITTENT_DURATIONS = ("exponential", "uniform")  # how spell lengths are drawn
INTERMITTENT_MIN_SPELL_S = 2 * FAULT_RAMP_S  # s, shortest spell: a fade in and a fade out
MAX_INTERMITTENT_SPELL_S = 3600.0  # s, a mean spell longer than this is a typo
INTERMITTENT_LEVEL_DRIFT_DB = 3.0  # dB, its level walks within +- this (std a third of it)
INTERMITTENT_LEVEL_TAU_S = 3.0  # s
INTERMITTENT_TONE_HZ = (90.0, 250.0)  # blade-pass/motor tone drawn from this range (the unit), Hz
INTERMITTENT_TONE_DRIFT = 0.03  # std of the tone frequency's wander, fraction
INTERMITTENT_TONE_TAU_S = 3.0  # s
INTERMITTENT_TONES = ((1, 0.6), (2, 0.3), (3, 0.15))  # harmonic order, amplitude (unit-RMS source)
INTERMITTENT_TILT_DB = 6.0  # dB, mean balance of its rumble over its hiss
INTERMITTENT_TILT_DRIFT_DB = 6.0  # dB, std of the walk of that balance (the spectral tilt)
INTERMITTENT_TILT_TAU_S = 5.0  # s
INTERMITTENT_RUMBLE_HZ = (40.0, 600.0)  # Hz, the low band of its broadband noise
INTERMITTENT_HISS_HZ = (400.0, 5000.0)  # Hz, the high band
# Its (unit-RMS) waveform is bent above KNEE x its RMS and never passes CREST x it: the
# rare 4-5 sigma noise peak would otherwise turn down the whole scene (the reference
# microphones stand 0.5 m from it); fewer than 0.3 % of its samples are touched.
INTERMITTENT_KNEE = 3.0
INTERMITTENT_CREST = 4.0
INTERMITTENT_OFFSET_M = 4.5  # default layout: this far along x beyond the last mic or machine, m
INTERMITTENT_HEIGHT_M = 1.0  # m
REFERENCE_MIC_OFFSET_M = 0.5  # default layout: reference microphones this far from the source, m


# ======================================================================================
# Scene description
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class Fault:
    """A fault of one machine between two times of the clip.

    ``kind`` is a key of ``FAULTS``. Times are in seconds from the start of the clip at
    the machine (it reaches a microphone d / 343 m/s later); ``end_s`` None: to the end.
    """

    kind: str
    start_s: float = 0.0
    end_s: Optional[float] = None

    def __post_init__(self):
        if self.kind not in FAULTS:
            raise ConfigError(f"fault {self.kind!r}: unknown kind. Known kinds: {', '.join(FAULTS)}.")
        end = math.inf if self.end_s is None else self.end_s
        if not (math.isfinite(self.start_s) and 0 <= self.start_s < end and not math.isnan(end)):
            raise ConfigError(
                f"fault {self.kind!r}: times {self.start_s}-{self.end_s} s: need 0 <= start < end."
            )

    def end(self, seconds: float) -> float:
        """The end time in a clip of ``seconds``, s."""
        return seconds if self.end_s is None else self.end_s


@dataclasses.dataclass(frozen=True)
class Machine:
    """One machine in the room.

    Parameters
    ----------
    kind : str
        One of ``MACHINE_TYPES``.
    name : str
        Unique in the scene; its stem is ``stems/<name>.wav``. Letters, digits, ``_``
        and ``-``, not starting with ``_``.
    position : (x, y, z)
        Acoustic centre, m.
    faults : tuple of Fault
    speed_hz : float or None
        Rotation rate of the shaft, Hz (for a valve: mean open/close events per second).
        None: a typical value drawn from the seed (pump 24-30 Hz, fan 10-20 Hz, motor
        mains / 2 less 2-4 % slip, valve one event every 1-3 s).
    gain_db : float
        Source level relative to ``MACHINE_RMS`` at 1 m, dB.
    """

    kind: str
    name: str
    position: tuple[float, float, float]
    faults: tuple[Fault, ...] = ()
    speed_hz: Optional[float] = None
    gain_db: float = 0.0

    def __post_init__(self):
        if self.kind not in MACHINE_TYPES:
            raise ConfigError(f"machine {self.name!r}: unknown type {self.kind!r}. Known types: "
                              f"{', '.join(MACHINE_TYPES)}.")
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise ConfigError(f"machine name {self.name!r}: use letters, digits, '_' and '-', "
                              "starting with a letter or digit.")
        object.__setattr__(self, "position", _point(self.position, f"machine {self.name!r}: position"))
        object.__setattr__(self, "faults", tuple(self.faults))
        for fault in self.faults:
            if self.kind not in FAULTS[fault.kind]:
                raise ConfigError(
                    f"machine {self.name!r}: a {self.kind} cannot have {fault.kind}; "
                    f"{fault.kind} happens to: {', '.join(FAULTS[fault.kind])}."
                )
        if self.speed_hz is not None and not (0 < self.speed_hz <= 200):
            raise ConfigError(f"machine {self.name!r}: speed_hz {self.speed_hz}: must be in (0, 200] Hz.")
        if not abs(self.gain_db) <= MAX_ABS_GAIN_DB:
            raise ConfigError(f"machine {self.name!r}: gain_db {self.gain_db}: must be within "
                              f"+-{MAX_ABS_GAIN_DB:g} dB.")


@dataclasses.dataclass(frozen=True)
class IntermittentNoise:
    """A noise source that comes and goes by itself: a ventilation fan, a compressor
    next door, a neighbouring line starting up. Not a machine being monitored.

    It switches on and off in spells of random length (times at the source, like a
    fault's; 50 ms fades in and out inside each spell). While on, its level walks slowly,
    its tone's frequency wanders and the tilt of its broadband noise drifts, so that no
    noise clip recorded with it off, nor one recorded at another time, describes it.

    Parameters
    ----------
    position : (x, y, z)
        m.
    level_db : float
        Its RMS at 1 m while on, relative to ``MACHINE_RMS`` (a healthy machine at 1 m), dB.
    mean_on_s, mean_off_s : float
        Mean length of a spell on and of a spell off, s (at least 0.2 s). Whether it is on
        at the start is drawn with probability mean_on / (mean_on + mean_off).
    durations : str
        ``"exponential"``: spell lengths of 0.1 s plus an exponential draw (mean as
        given); ``"uniform"``: uniform in 0.5-1.5 x the mean.
    level_drift_db : float
        How far its level wanders from ``level_db``, dB: a slow random walk that stays
        within +-level_drift_db (its standard deviation is a third of that); 0: steady.
    tone_hz : float or None
        Its blade-pass or motor tone, Hz (with the 2nd and 3rd harmonics). None: drawn
        from the unit in ``INTERMITTENT_TONE_HZ``.
    tone_drift : float
        Standard deviation of the tone frequency's slow wander, as a fraction (0.03: 3 %).
    tilt_drift_db : float
        Standard deviation of the slow walk of its spectral tilt (the balance of its
        40-600 Hz rumble over its 0.4-5 kHz hiss, ``INTERMITTENT_TILT_DB`` on average), dB.
    """

    position: tuple[float, float, float]
    level_db: float = INTERMITTENT_LEVEL_DB
    mean_on_s: float = INTERMITTENT_MEAN_ON_S
    mean_off_s: float = INTERMITTENT_MEAN_OFF_S
    durations: str = "exponential"
    level_drift_db: float = INTERMITTENT_LEVEL_DRIFT_DB
    tone_hz: Optional[float] = None
    tone_drift: float = INTERMITTENT_TONE_DRIFT
    tilt_drift_db: float = INTERMITTENT_TILT_DRIFT_DB

    def __post_init__(self):
        object.__setattr__(self, "position", _point(self.position, "intermittent noise: position"))

        def number(value, what, ok, need):
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = math.nan
            if not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"intermittent noise: {what} {getattr(self, what)!r}: {need}.")
            object.__setattr__(self, what, value)

        number(self.level_db, "level_db", lambda v: abs(v) <= MAX_ABS_GAIN_DB,
               f"must be within +-{MAX_ABS_GAIN_DB:g} dB of a machine's level")
        for what in ("mean_on_s", "mean_off_s"):
            number(getattr(self, what), what,
                   lambda v: 2 * INTERMITTENT_MIN_SPELL_S <= v <= MAX_INTERMITTENT_SPELL_S,
                   f"must be {2 * INTERMITTENT_MIN_SPELL_S:g} to {MAX_INTERMITTENT_SPELL_S:g} s")
        if self.durations not in INTERMITTENT_DURATIONS:
            raise ConfigError(f"intermittent noise: durations {self.durations!r}: use "
                              f"{' or '.join(INTERMITTENT_DURATIONS)}.")
        number(self.level_drift_db, "level_drift_db", lambda v: 0 <= v <= 10, "must be 0 to 10 dB")
        if self.tone_hz is not None:
            number(self.tone_hz, "tone_hz", lambda v: 20 <= v <= 1000, "must be 20 to 1000 Hz, or none (drawn)")
        number(self.tone_drift, "tone_drift", lambda v: 0 <= v <= 0.1,
               "must be 0 to 0.1 (a fraction of the tone frequency)")
        number(self.tilt_drift_db, "tilt_drift_db", lambda v: 0 <= v <= 20, "must be 0 to 20 dB")


@dataclasses.dataclass(frozen=True)
class Scene:
    """Machines and microphones in one room, and how to render them.

    Parameters
    ----------
    machines : tuple of Machine
        May be empty: the room alone (then ``snr_db`` must be None).
    mics : tuple of (x, y, z)
        Microphone positions, m. Row N of every output array is mic N; mic 0 is the
        reference for ``snr_db``.
    seconds : float
        Clip length, s.
    sample_rate : int
        Hz, at least ``MIN_SAMPLE_RATE``.
    snr_db : float or None
        Power of the machines running normally (faults excluded) over the power of the
        background, at mic 0, over the whole clip, dB. None: the background at its
        fixed nominal level (``BACKGROUND_RMS``), the same whatever the machines.
    reverb_rt60_s : float or None
        Reverberation time, s; None: free field (direct sound only).
    seed : int
        Seeds everything. Each machine (by name), microphone path and background part
        draws from its own child generator, so adding a machine or a microphone leaves
        the others' sound unchanged.
    line_hz : float
        Mains frequency (motor hum at twice it), Hz.
    unit : int or None
        Seeds the installation only: the machines' designs and operating points
        (``_parameters``: speed, vane/blade/slot counts...), the reverberation tails and
        the distant background machine's position and speed. ``seed`` then draws one
        recording of that installation (drifts, noise, phases, events, fault severity).
        None: the same as ``seed`` (every seed another installation).
    event_rate_hz : float
        Knocks, clanks and forklift beeps in the background per second (Poisson).
    intermittent : IntermittentNoise or None
        A noise source that comes and goes, heard at every microphone and reference
        microphone; it does not count in ``snr_db``. Its streams are its own: the machines
        and the background are the same with and without it.
    references : tuple of (x, y, z)
        Reference microphone positions, m (usually next to the intermittent source). They
        record what a machine microphone would at their place, with their own diffuse
        noise; their streams are their own, so they change nothing at the microphones.
    """

    machines: tuple[Machine, ...]
    mics: tuple[tuple[float, float, float], ...]
    seconds: float = DEFAULT_SECONDS
    sample_rate: int = DEFAULT_SAMPLE_RATE
    snr_db: Optional[float] = DEFAULT_SNR_DB
    reverb_rt60_s: Optional[float] = None
    seed: int = 0
    line_hz: float = DEFAULT_LINE_HZ
    unit: Optional[int] = None
    event_rate_hz: float = EVENT_RATE_HZ
    intermittent: Optional[IntermittentNoise] = None
    references: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "machines", tuple(self.machines))
        mics = tuple(_point(m, f"mic {i}: position") for i, m in enumerate(self.mics))
        object.__setattr__(self, "mics", mics)
        refs = tuple(_point(m, f"reference mic {i}: position") for i, m in enumerate(self.references))
        object.__setattr__(self, "references", refs)
        if self.intermittent is not None and not isinstance(self.intermittent, IntermittentNoise):
            raise ConfigError(f"intermittent {self.intermittent!r}: must be an IntermittentNoise, or none.")
        for i, ref in enumerate(refs):
            # The distant background machine stands up to 25 m from mic 0 and must reach
            # every reference microphone within the pre-roll too.
            d = _distance(ref, mics[0]) if mics else 0.0
            if d > MAX_DISTANCE_M - 25.0:
                raise ConfigError(f"reference mic {i} is {d:.0f} m from mic 0; at most "
                                  f"{MAX_DISTANCE_M - 25.0:g} m is simulated.")
        if not self.mics:
            raise ConfigError("mics: a scene needs at least one microphone.")
        if not (math.isfinite(self.seconds) and 0 < self.seconds <= MAX_SECONDS):
            raise ConfigError(f"seconds {self.seconds}: must be a positive number of seconds, at most "
                              f"{MAX_SECONDS:g} (for more audio, simulate several seeds).")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, (int, np.integer)) \
                or self.sample_rate < MIN_SAMPLE_RATE:
            raise ConfigError(f"sample_rate {self.sample_rate}: must be an integer of at least "
                              f"{MIN_SAMPLE_RATE} Hz.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ConfigError(f"seed {self.seed!r}: must be an integer >= 0.")
        if self.unit is not None and (isinstance(self.unit, bool) or not isinstance(self.unit, (int, np.integer))
                                      or self.unit < 0):
            raise ConfigError(f"unit {self.unit!r}: must be an integer >= 0, or none (the seed's own unit).")
        if self.reverb_rt60_s is not None and not (0 < self.reverb_rt60_s <= MAX_RT60_S):
            raise ConfigError(f"reverb RT60 {self.reverb_rt60_s}: must be in (0, {MAX_RT60_S:g}] s, or none.")
        if not (math.isfinite(self.event_rate_hz) and 0 <= self.event_rate_hz <= 100):
            raise ConfigError(f"event_rate_hz {self.event_rate_hz}: must be 0 to 100 background events per second.")
        if not (0 < self.line_hz <= 1000):
            raise ConfigError(f"line_hz {self.line_hz}: must be the mains frequency in Hz (50 or 60).")
        if self.snr_db is not None and not math.isfinite(self.snr_db):
            raise ConfigError(f"snr_db {self.snr_db}: must be a finite number of dB, or none.")
        if self.snr_db is not None and not self.machines:
            raise ConfigError("snr_db: a room without machines has no SNR; pass snr_db=None "
                              "(--snr none) for the background at its nominal level.")
        names = [m.name for m in self.machines]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"machine name {name!r} is used twice; names must be unique.")
        for machine in self.machines:
            for fault in machine.faults:
                if fault.end(self.seconds) > self.seconds or fault.start_s >= self.seconds:
                    raise ConfigError(
                        f"machine {machine.name!r}: {fault.kind} at {fault.start_s:g}-"
                        f"{fault.end(self.seconds):g} s is outside the {self.seconds:g} s clip."
                    )
            for i, mic in enumerate(self.mics):
                d = _distance(machine.position, mic)
                if d > MAX_DISTANCE_M:
                    raise ConfigError(f"machine {machine.name!r} is {d:.0f} m from mic {i}; "
                                      f"at most {MAX_DISTANCE_M:g} m is simulated.")
            for i, mic in enumerate(self.references):
                d = _distance(machine.position, mic)
                if d > MAX_DISTANCE_M:
                    raise ConfigError(f"machine {machine.name!r} is {d:.0f} m from reference mic {i}; "
                                      f"at most {MAX_DISTANCE_M:g} m is simulated.")
        if self.intermittent is not None:
            for what, mic in [*((f"mic {i}", m) for i, m in enumerate(self.mics)),
                              *((f"reference mic {i}", m) for i, m in enumerate(self.references))]:
                d = _distance(self.intermittent.position, mic)
                if d > MAX_DISTANCE_M:
                    raise ConfigError(f"the intermittent noise source is {d:.0f} m from {what}; "
                                      f"at most {MAX_DISTANCE_M:g} m is simulated.")

    @property
    def samples(self) -> int:
        """Samples per channel."""
        return round(self.seconds * self.sample_rate)

    @property
    def unit_seed(self) -> int:
        """The seed of what stays the same between recordings: ``unit``, else ``seed``."""
        return int(self.seed if self.unit is None else self.unit)


@dataclasses.dataclass(frozen=True, eq=False)
class Rendering:
    """A rendered scene. Every array is float32, full scale 1.0; shape = (mics, samples)
    but for the two reference arrays, shape = (references, samples).

    ``mixture`` equals the sum of ``stems`` plus ``background`` plus ``intermittent`` to
    float32 precision. ``reference`` is what the reference microphones record (the
    machines, the background and the intermittent source at their places);
    ``reference_intermittent`` is its intermittent part. Without an intermittent source,
    ``intermittent`` and ``reference_intermittent`` are zeros; without reference
    microphones, both reference arrays have shape (0, samples).
    """

    mixture: np.ndarray
    stems: dict[str, np.ndarray]  # machine name -> that machine alone at the mics
    background: np.ndarray  # the room alone
    labels: dict  # JSON-serialisable description, written as labels.json
    intermittent: Optional[np.ndarray] = None  # the intermittent source alone at the mics
    reference: Optional[np.ndarray] = None  # what the reference microphones record
    reference_intermittent: Optional[np.ndarray] = None  # the intermittent source alone there

    def __post_init__(self):
        samples = self.mixture.shape[-1]
        if self.intermittent is None:
            object.__setattr__(self, "intermittent", np.zeros_like(self.mixture))
        if self.reference is None:
            object.__setattr__(self, "reference", np.zeros((0, samples), np.float32))
        if self.reference_intermittent is None:
            object.__setattr__(self, "reference_intermittent", np.zeros_like(self.reference))

    @property
    def sample_rate(self) -> int:
        return self.labels["sample_rate"]


def default_scene(
    machines: Sequence[str] = DEFAULT_MACHINES,
    n_mics: int = DEFAULT_MICS,
    faults: Sequence[tuple[str, Fault]] = (),
    intermittent: Union[None, bool, IntermittentNoise] = None,
    references: int = 0,
    **options: Any,
) -> Scene:
    """A plant-room layout: microphones on a line, machines in front of and behind it.

    Microphones are ``MIC_SPACING_M`` apart along x at ``MIC_HEIGHT_M``, centred on the
    origin; machine j sits ``MACHINE_SPACING_M`` from the next along x, alternately
    ``MACHINE_SIDE_M`` on either side of the line, at ``MACHINE_HEIGHT_M``. With the
    defaults, the pump is nearest mics 0-1 and the fan nearest mics 2-3.

    The intermittent source (``intermittent``) stands off the +x end of the layout, on
    the microphone line (y = 0), ``INTERMITTENT_OFFSET_M`` beyond the last microphone or
    machine, whichever is further out, at ``INTERMITTENT_HEIGHT_M``: with the defaults
    at (6.0, 0, 1.0), 4.5 m from mic 3 and 5.2 m from the nearest machine, further from
    the machines than any microphone is. Reference microphone k stands
    ``REFERENCE_MIC_OFFSET_M`` from it at its height, at an angle of 180 + 360 k / count
    degrees from +x (the first one on the side facing the array).

    Parameters
    ----------
    machines : sequence of str
        Machine types; each is named after its type, repeats as ``<type>_2``, ``<type>_3``...
    n_mics : int
    faults : sequence of (machine name, Fault)
    intermittent : None, True or IntermittentNoise
        None or False: no intermittent source. True: ``IntermittentNoise`` with its
        defaults at the place above; an ``IntermittentNoise``: that one, where it says.
    references : int
        Reference microphones around the intermittent source (or, without one, around
        where it would stand).
    **options
        Other ``Scene`` fields: seconds, sample_rate, snr_db, reverb_rt60_s, seed, line_hz,
        unit, event_rate_hz.
    """
    if isinstance(machines, str):
        machines = (machines,)
    if not isinstance(n_mics, (int, np.integer)) or n_mics < 1:
        raise ConfigError(f"mics {n_mics!r}: need at least one microphone.")
    if isinstance(references, bool) or not isinstance(references, (int, np.integer)) or references < 0:
        raise ConfigError(f"references {references!r}: must be a number of reference microphones, 0 or more.")
    mics = tuple(((i - (n_mics - 1) / 2) * MIC_SPACING_M, 0.0, MIC_HEIGHT_M) for i in range(n_mics))
    names = machine_names(machines)
    by_name: dict[str, list[Fault]] = {name: [] for name in names}
    for name, fault in faults:
        if name not in by_name:
            known = ", ".join(names) or "none"
            raise ConfigError(f"fault {fault.kind!r} for machine {name!r}: no machine of that name "
                              f"in the scene (machines: {known}).")
        by_name[name].append(fault)
    placed = tuple(
        Machine(
            kind=kind, name=name,
            position=((j - (len(names) - 1) / 2) * MACHINE_SPACING_M,
                      MACHINE_SIDE_M if j % 2 == 0 else -MACHINE_SIDE_M, MACHINE_HEIGHT_M),
            faults=tuple(by_name[name]),
        )
        for j, (kind, name) in enumerate(zip(machines, names))
    )
    end = max([m[0] for m in mics] + [m.position[0] for m in placed])
    spot = (end + INTERMITTENT_OFFSET_M, 0.0, INTERMITTENT_HEIGHT_M)
    if intermittent is True:
        intermittent = IntermittentNoise(spot)
    elif intermittent is False:
        intermittent = None
    if intermittent is not None and not isinstance(intermittent, IntermittentNoise):
        raise ConfigError(f"intermittent {intermittent!r}: must be an IntermittentNoise, true or none.")
    centre = spot if intermittent is None else intermittent.position
    refs = tuple(
        (centre[0] + REFERENCE_MIC_OFFSET_M * math.cos(math.pi + 2 * math.pi * k / references),
         centre[1] + REFERENCE_MIC_OFFSET_M * math.sin(math.pi + 2 * math.pi * k / references), centre[2])
        for k in range(references)
    )
    if intermittent is not None or refs:
        options = {**options, "intermittent": intermittent, "references": refs}
    return Scene(machines=placed, mics=mics, **options)


def machine_names(kinds: Sequence[str]) -> tuple[str, ...]:
    """Names for machines of these types: the type, then ``<type>_2``, ``<type>_3``..."""
    names, seen = [], {}
    for kind in kinds:
        if kind not in MACHINE_TYPES:
            raise ConfigError(f"machine type {kind!r}: unknown. Known types: {', '.join(MACHINE_TYPES)}.")
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}_{seen[kind]}")
    return tuple(names)


# ======================================================================================
# Rendering
# ======================================================================================
def render(scene: Scene) -> Rendering:
    """Render a scene: every machine and the background at every microphone.

    Pure and deterministic: the same scene (seed included) gives bit-identical arrays.

    Returns
    -------
    Rendering
        float32 arrays of shape = (len(scene.mics), scene.samples) (the reference arrays:
        (len(scene.references), scene.samples)) and the labels.
    """
    # Every array below has a row per microphone, then a row per reference microphone.
    stems, healthy_at_ref, machine_labels = _render_machines(scene)
    background, background_labels = _render_background(scene)
    intermittent, intermittent_labels = _render_intermittent(scene)

    raw_power = float(np.mean(background[0] ** 2))
    if scene.snr_db is None:
        bg_gain = 1.0
    else:
        machine_power = float(np.mean(healthy_at_ref ** 2))
        bg_gain = math.sqrt(machine_power / raw_power / 10 ** (scene.snr_db / 10))
    background *= bg_gain
    total = background + sum(stems.values()) if stems else background.copy()
    if intermittent is not None:
        total += intermittent

    # A fixed level, not per clip normalisation: turn down only what would clip (at a
    # microphone or a reference microphone), and say so in the labels.
    peak = float(np.max(np.abs(total)))
    limiter = min(1.0, PEAK_LIMIT / peak) if peak > 0 else 1.0
    if limiter < 1.0:
        log.warning("mixture would peak at %.2f: scene turned down by %.1f dB", peak, -_db(limiter ** 2))
        total *= limiter
        background *= limiter
        for s in stems.values():
            s *= limiter
        if intermittent is not None:
            intermittent *= limiter

    n_mics = len(scene.mics)
    machines_at_ref = (total[0] - background[0])
    if intermittent is not None:
        machines_at_ref -= intermittent[0]
    measured = (_db(np.mean(machines_at_ref ** 2) / np.mean(background[0] ** 2))
                if stems else None)
    n_refs = len(scene.references)
    labels = {
        "format": LABELS_FORMAT,
        "generator": f"signalcraft.simulate {__version__}",
        "sample_rate": scene.sample_rate,
        "duration_s": scene.seconds,
        "samples": scene.samples,
        "seed": int(scene.seed),
        "unit": scene.unit_seed,  # seeds the machines' designs and the room (Scene.unit)
        "line_hz": scene.line_hz,
        "snr_db": scene.snr_db,
        "measured_snr_db": measured,  # faults included
        "reverb_rt60_s": scene.reverb_rt60_s,
        "level_gain_db": _db(limiter ** 2),  # < 0 only where the scene was turned down
        "peak": float(np.max(np.abs(total[:n_mics]))),  # of the machine microphones
        "reference_peak": float(np.max(np.abs(total[n_mics:]))) if n_refs else None,
        "mics": [list(m) for m in scene.mics],
        "references": [list(m) for m in scene.references],
        # 1-based columns of mixture.wav: capture.channels and capture.reference_channels
        "channels": {"mics": list(range(1, n_mics + 1)),
                     "references": list(range(n_mics + 1, n_mics + n_refs + 1))},
        "machines": machine_labels,
        "faults": [
            {"machine": m["name"], "fault": f["fault"], "start_s": f["start_s"], "end_s": f["end_s"]}
            for m in machine_labels for f in m["faults"]
        ],
        "background": {**background_labels, "gain_db": _db(bg_gain ** 2 * limiter ** 2)},
        "intermittent": None if intermittent is None else {
            **intermittent_labels, "gain_db": _db(limiter ** 2)},
    }
    zeros = np.zeros((n_mics + n_refs, scene.samples), np.float32)
    heard = zeros if intermittent is None else intermittent.astype(np.float32)
    return Rendering(
        mixture=total[:n_mics].astype(np.float32),
        stems={name: s[:n_mics].astype(np.float32) for name, s in stems.items()},
        background=background[:n_mics].astype(np.float32),
        labels=labels,
        intermittent=heard[:n_mics],
        reference=total[n_mics:].astype(np.float32),
        reference_intermittent=heard[n_mics:],
    )


def machine_signal(
    kind: str,
    seconds: float,
    sample_rate: int,
    rng: np.random.Generator,
    speed_hz: Optional[float] = None,
    faults: Sequence[Fault] = (),
    line_hz: float = DEFAULT_LINE_HZ,
) -> np.ndarray:
    """One machine as heard 1 m away in free field, at ``MACHINE_RMS`` when healthy.

    Parameters
    ----------
    kind : str
        One of ``MACHINE_TYPES``.
    seconds : float
    sample_rate : int
        Hz.
    rng : numpy.random.Generator
        One number is drawn from it; everything else comes from child generators.
    speed_hz, faults, line_hz
        As for ``Machine`` and ``Scene``.

    Returns
    -------
    numpy.ndarray
        float32, shape = (samples,).
    """
    machine = Machine(kind, kind, (0.0, 0.0, 0.0), tuple(faults), speed_hz)
    Scene((machine,), ((0.0, 0.0, 0.0),), seconds, sample_rate, None, line_hz=line_hz)  # validates
    healthy, faulty, _ = _synthesise(machine, seconds, sample_rate, int(rng.integers(2**63)), line_hz)
    return (MACHINE_RMS * (healthy + faulty)).astype(np.float32)


def _render_machines(scene: Scene) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict]]:
    """Each machine at each mic and then each reference mic, float64 shape = (mics +
    references, samples); the healthy machines' sum at mic 0, shape = (samples,); the
    machines' labels."""
    n, sr = scene.samples, scene.sample_rate
    pre = _pre_roll(scene)
    stems: dict[str, np.ndarray] = {}
    healthy_ref = np.zeros(n)
    labels = []
    for machine in scene.machines:
        root = _seed_int(scene.seed, "machine", machine.name)
        design = _seed_int(scene.unit_seed, "machine", machine.name)  # == root when unit is None
        healthy, faulty, info = _synthesise(machine, scene.seconds, sr, root, scene.line_hz, pre, design)
        level = MACHINE_RMS * 10 ** (machine.gain_db / 20)
        paths = _paths(scene, machine.position, machine.name)
        has_fault = bool(np.any(faulty))
        stem, ref = _propagate(level * (healthy + faulty), paths, sr, pre + n,
                               reference=level * healthy if has_fault else None)
        stem = _and_references(scene, stem, level * (healthy + faulty), machine.position, machine.name, pre + n)
        stems[machine.name] = stem[:, pre:]
        healthy_ref += (ref if has_fault else stem[0])[pre:]
        labels.append({
            "name": machine.name,
            "type": machine.kind,
            "position": list(machine.position),
            "gain_db": machine.gain_db,
            "parameters": info["parameters"],
            "faults": info["faults"],
            "distance_m": [p.distance for p in paths.direct],
            "delay_s": [p.distance / SPEED_OF_SOUND for p in paths.direct],
        })
    return stems, healthy_ref, labels


def _pre_roll(scene: Scene) -> int:
    """Samples synthesised before t = 0: the longest propagation plus the reverb tail."""
    return round(PRE_ROLL_S * scene.sample_rate) + _tail_samples(scene)


# ======================================================================================
# Machines
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class _Drive:
    """The running state one machine's healthy sound and its faults share."""

    sr: int
    n: int
    shaft_hz: float  # nominal rotation rate (valve: actuation rate), Hz
    phase: np.ndarray  # integrated shaft angle, rad, shape = (n,)
    load: np.ndarray  # slow amplitude modulation, linear, shape = (n,)
    one_x: tuple[float, float]  # amplitude and phase of the healthy 1x tone


def _synthesise(machine: Machine, seconds: float, sr: int, root: int, line_hz: float, pre: int = 0,
                design: Optional[int] = None):
    """A machine's healthy sound and the sum of its faults, float64 shape = (pre +
    round(seconds * sr),), in units of ``MACHINE_RMS``, and its labels. The first ``pre``
    samples come before t = 0 of the clip (fault times count from t = 0). ``design``
    seeds the machine's parameters (the unit), ``root`` everything else (the recording);
    None: ``root`` seeds both."""
    n = pre + round(seconds * sr)
    kind = machine.kind
    params = _parameters(kind, _rng(root if design is None else design, "parameters"), machine.speed_hz, line_hz)
    f0 = params["speed_hz"]
    drift = _slow_walk(_rng(root, "speed"), n, sr, SPEED_DRIFT[kind], SPEED_DRIFT_TAU_S)
    phase = (2 * np.pi / sr) * np.cumsum(f0 * (1 + drift))
    load = 10 ** (_slow_walk(_rng(root, "load"), n, sr, LOAD_STD_DB, LOAD_TAU_S) / 20)
    sound = _rng(root, "sound")
    one_x_phase = float(sound.uniform(0, 2 * np.pi))
    drive = _Drive(sr, n, f0, phase, load, (ONE_X[kind], one_x_phase))
    healthy = _HEALTHY[kind](drive, params, sound) * load

    faulty = np.zeros(n)
    fault_labels = []
    for k, fault in enumerate(machine.faults):
        end = fault.end(seconds)
        i0, i1 = pre + round(fault.start_s * sr), min(n, pre + round(end * sr))
        # Each fault draws from its own stream: the healthy sound is the same with or without it.
        sound_of = _FAULT_SOUNDS[fault.kind]
        component, fparams = sound_of(drive, params, _rng(root, "fault", k, fault.kind), i0, i1)
        faulty[i0:i1] += component * _fade(i1 - i0, sr) * load[i0:i1]
        fault_labels.append({"fault": fault.kind, "start_s": fault.start_s, "end_s": end,
                             "parameters": fparams})
    return healthy, faulty, {"parameters": params, "faults": fault_labels}


def _parameters(kind: str, rng: np.random.Generator, speed_hz: Optional[float], line_hz: float) -> dict:
    """Operating and design parameters of one machine, JSON-serialisable. Every draw is
    made whatever ``speed_hz`` is, so fixing the speed leaves the rest unchanged."""
    if kind == "pump":
        p = {"speed_hz": rng.uniform(24.0, 30.0), "n_vanes": int(rng.integers(5, 8))}
    elif kind == "fan":
        p = {"speed_hz": rng.uniform(10.0, 20.0), "n_blades": int(rng.integers(6, 13)),
             "turbulence_cutoff_hz": rng.uniform(500.0, 1000.0)}
    elif kind == "motor":
        slip = rng.uniform(0.02, 0.04)
        p = {"speed_hz": line_hz / MOTOR_POLE_PAIRS * (1 - slip), "line_hz": line_hz,
             "rotor_slots": int(rng.choice([28, 32, 36, 40, 44]))}
    else:  # valve: speed_hz is the mean actuation rate
        p = {"speed_hz": 1 / rng.uniform(1.0, 3.0), "thump_hz": rng.uniform(60.0, 150.0),
             "click_hz": rng.uniform(1500.0, 3500.0), "open_at_start": bool(rng.random() < 0.5)}
    if speed_hz is not None:
        p["speed_hz"] = float(speed_hz)
    p["speed_drift"] = SPEED_DRIFT[kind]
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in p.items()}


def _pump(d: _Drive, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Shaft harmonics, vane pass (n_vanes x shaft) with shaft-rate sidebands, flow noise
    (150-3000 Hz) modulated at the shaft rate. Unit RMS."""
    ph = d.phase
    x = d.one_x[0] * np.sin(ph + d.one_x[1])
    x += _harmonics(d, ph, [(2, 0.15), (3, 0.10), (4, 0.06)], rng)
    v = p["n_vanes"]
    sidebands = 1 + 0.3 * np.sin(ph + rng.uniform(0, 2 * np.pi))
    x += sidebands * _harmonics(d, ph, [(v, 0.8), (2 * v, 0.35)], rng)
    flow = _shaped_noise(rng, d.n, d.sr, lambda f: _band(f, 150.0, 3000.0))
    return x + 0.7 * flow * (1 + 0.3 * np.sin(ph + rng.uniform(0, 2 * np.pi)))


def _fan(d: _Drive, p: dict, rng: np.random.Generator) -> np.ndarray:
    """1x/2x shaft, blade pass (n_blades x shaft) and two harmonics, low-passed
    turbulence. Unit RMS."""
    ph = d.phase
    x = d.one_x[0] * np.sin(ph + d.one_x[1]) + _harmonics(d, ph, [(2, 0.06)], rng)
    b = p["n_blades"]
    uneven = 1 + 0.2 * np.sin(ph + rng.uniform(0, 2 * np.pi))  # blades not quite alike
    x += uneven * _harmonics(d, ph, [(b, 0.55), (2 * b, 0.3), (3 * b, 0.15)], rng)
    turbulence = _shaped_noise(rng, d.n, d.sr, lambda f: _band(f, 30.0, p["turbulence_cutoff_hz"]))
    return x + 0.85 * turbulence


def _motor(d: _Drive, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Hum at 2, 4, 6 x mains (locked to the grid, not the shaft), 1x/2x rotation, rotor
    slot harmonics at slots x rotation and +- 2 x mains, windage and bearing noise."""
    ph = d.phase
    t = np.arange(d.n) / d.sr
    line = p["line_hz"]
    x = np.zeros(d.n)
    for order, amp in [(2, 0.8), (4, 0.2), (6, 0.1)]:
        if order * line < TONE_LIMIT * d.sr:
            x += amp * np.sin(2 * np.pi * order * line * t + rng.uniform(0, 2 * np.pi))
    x += d.one_x[0] * np.sin(ph + d.one_x[1]) + _harmonics(d, ph, [(2, 0.05)], rng)
    slots = p["rotor_slots"]
    for sign, amp in [(-1, 0.35), (0, 0.1), (1, 0.35)]:
        if slots * d.shaft_hz + sign * 2 * line < TONE_LIMIT * d.sr:
            x += amp * np.sin(slots * ph + sign * 2 * np.pi * 2 * line * t + rng.uniform(0, 2 * np.pi))
    x += 0.6 * _shaped_noise(rng, d.n, d.sr, lambda f: _band(f, 30.0, 400.0))
    x += 0.2 * _shaped_noise(rng, d.n, d.sr, lambda f: _band(f, 2000.0, 6000.0))
    return x


def _valve(d: _Drive, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Open/close events every ~1/speed_hz s: a thump and a click (decaying resonances,
    closing louder, onto the seat), flow hiss while open."""
    sr, n = d.sr, d.n
    rate = d.shaft_hz
    gaps = rng.uniform(0.6, 1.4, size=int(n / sr * rate / 0.6) + 2) / rate
    times = rng.uniform(0, 1 / rate) + np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    strength = rng.uniform(0.8, 1.2, size=times.size)
    idx = np.round(times * sr).astype(int)
    keep = idx < n
    idx, strength = idx[keep], strength[keep]
    opens_first = not p["open_at_start"]
    closing = (np.arange(idx.size) % 2 == 0) != opens_first
    kicks = np.zeros(n)
    kicks[idx] = strength * np.where(closing, 1.5, 1.0)
    x = 2.5 * _ring(kicks, p["thump_hz"], 0.040, sr)
    x += 1.5 * _ring(kicks, min(p["click_hz"], 0.4 * sr), 0.004, sr)
    # Open or shut between events; the valve takes ~0.2 s to stroke.
    state = (np.searchsorted(idx, np.arange(n), side="right") % 2 == 1) == opens_first
    stroke = max(1, round(0.2 * sr))
    opening = _moving_average(state.astype(float), stroke)
    hiss = _shaped_noise(rng, n, sr, lambda f: _band(f, 500.0, 6000.0))
    return x + 1.2 * opening * hiss


_HEALTHY = {"pump": _pump, "fan": _fan, "motor": _motor, "valve": _valve}


# --- Faults: each returns its sound over samples [i0, i1) (before fade and load) -------
def _imbalance(d: _Drive, p: dict, rng: np.random.Generator, i0: int, i1: int):
    gain_db = rng.uniform(15.0, 20.0)
    amp, phase = d.one_x
    extra = (10 ** (gain_db / 20) - 1) * amp  # in phase with the healthy 1x tone
    return extra * np.sin(d.phase[i0:i1] + phase), {"one_x_gain_db": gain_db}


def _bearing(d: _Drive, p: dict, rng: np.random.Generator, i0: int, i1: int):
    """Outer-race defect: impacts at BPFO = ratio x shaft rate, each ringing a resonance."""
    ratio = rng.uniform(3.0, 4.0)
    resonance = min(rng.uniform(2000.0, 4000.0), 0.4 * d.sr)
    decay = rng.uniform(0.0015, 0.003)
    amp = rng.uniform(2.5, 3.5)
    rolls = np.floor(d.phase[i0:i1] * ratio / (2 * np.pi))
    hits = np.flatnonzero(np.diff(rolls)) + 1
    # Rolling elements slip: impacts jitter by ~1 % of their period.
    hits = hits + np.round(rng.normal(0, 0.01 * d.sr / (ratio * d.shaft_hz), hits.size)).astype(int)
    hits = hits[(hits >= 0) & (hits < i1 - i0)]
    kicks = np.zeros(i1 - i0)  # ringing past the window end is faded out with it
    np.add.at(kicks, hits, amp * rng.uniform(0.7, 1.3, hits.size))
    return _ring(kicks, resonance, decay, d.sr), {
        "defect_order": ratio, "defect_hz": ratio * d.shaft_hz, "resonance_hz": resonance,
        "decay_ms": 1000 * decay,
    }


def _cavitation(d: _Drive, p: dict, rng: np.random.Generator, i0: int, i1: int):
    """Collapsing vapour bubbles: Poisson bursts of high-passed noise (crackle)."""
    m, sr = i1 - i0, d.sr
    rate = rng.uniform(300.0, 800.0)  # bursts per second
    decay = rng.uniform(0.0002, 0.0006)  # s
    level = rng.uniform(0.9, 1.3)  # RMS, machine units
    sigma = 0.5  # log-normal spread of burst strength
    count = rng.poisson(rate * m / sr)
    kicks = np.zeros(m)
    np.add.at(kicks, rng.integers(0, m, count), rng.lognormal(0, sigma, count))
    a = math.exp(-1 / (decay * sr))
    envelope = _lfilter([1.0], [1.0, -a], kicks)
    # Expected power of the envelope (shot noise), so the level is fixed, not measured.
    lam = rate / sr
    power = lam * math.exp(2 * sigma**2) / (1 - a * a) + (lam * math.exp(sigma**2 / 2) / (1 - a)) ** 2
    carrier = _shaped_noise(rng, m, sr, lambda f: _band(f, 1000.0, 0.45 * sr))
    # Soft-limit the rare huge burst (crest factors reach 50) so that it does not turn
    # the whole scene down; what is left is still strongly impulsive.
    crackle = envelope * carrier / math.sqrt(power)
    crackle = CAVITATION_CREST * np.tanh(crackle / CAVITATION_CREST)
    return level * crackle, {"burst_rate_hz": rate, "rms": level}


def _looseness(d: _Drive, p: dict, rng: np.random.Generator, i0: int, i1: int):
    """Mechanical looseness and rubbing: harmonics to 20x, half orders, and a clipped
    rub once per revolution."""
    ph = d.phase[i0:i1]
    top = min(TONE_LIMIT * d.sr, 20.5 * d.shaft_hz * 1.05)
    halves = [k for k in range(1, 41) if k != 2 and k * d.shaft_hz / 2 * 1.05 < top]
    x = np.zeros(i1 - i0)
    for k in halves:
        amp = (0.5 if k % 2 == 0 else 0.35) * (k / 2) ** -0.5 * rng.uniform(0.7, 1.3)
        x += amp * np.sin(k * ph / 2 + rng.uniform(0, 2 * np.pi))
    where = ((ph - rng.uniform(0, 2 * np.pi)) / (2 * np.pi)) % 1.0
    width = 0.05  # of a revolution
    contact = np.where(where < width, np.sin(np.pi * where / width) ** 2, 0.0)
    rub = _shaped_noise(rng, i1 - i0, d.sr, lambda f: _band(f, 1000.0, 6000.0))
    x += 0.6 * np.clip(2.5 * rub * contact, -1.0, 1.0)
    return x, {"highest_order": max(halves) / 2 if halves else 0.0}


def _leak(d: _Drive, p: dict, rng: np.random.Generator, i0: int, i1: int):
    """Gas or liquid forced through the closed seat: steady high-frequency hiss."""
    lo, hi = rng.uniform(3500.0, 4500.0), min(rng.uniform(6500.0, 7500.0), TONE_LIMIT * d.sr)
    level = rng.uniform(1.0, 1.5)
    hiss = _shaped_noise(rng, i1 - i0, d.sr, lambda f: _band(f, lo, hi, order=4))
    return level * hiss, {"band_hz": [lo, hi], "rms": level}


_FAULT_SOUNDS = {"imbalance": _imbalance, "bearing": _bearing, "cavitation": _cavitation,
                 "looseness": _looseness, "leak": _leak}


# ======================================================================================
# Background
# ======================================================================================
def _render_background(scene: Scene) -> tuple[np.ndarray, dict]:
    """The room without the machines at its nominal level, float64 shape = (mics +
    references, samples), and its labels."""
    n, sr, seed = scene.samples, scene.sample_rate, scene.seed
    mics = len(scene.mics)
    out = np.zeros((mics + len(scene.references), n))

    # Diffuse noise: pink above ~100 Hz, brown rumble below, shared slow level changes.
    level = 10 ** (_slow_walk(_rng(seed, "background", "level"), n, sr, BACKGROUND_LEVEL_STD_DB,
                              BACKGROUND_LEVEL_TAU_S) / 20)
    def colour(f):
        f = np.maximum(f, 1.0)
        return np.sqrt(100.0 / f + 0.5 * (100.0 / f) ** 2) * _band(f, 20.0, 6000.0)
    for m in range(mics):
        out[m] = BACKGROUND_RMS * level * _shaped_noise(_rng(seed, "background", "diffuse", m), n, sr, colour)
    for k in range(len(scene.references)):  # their own draws: the mics' noise stays as it is
        out[mics + k] = BACKGROUND_RMS * level * _shaped_noise(
            _rng(seed, "background", "diffuse", "reference", k), n, sr, colour)

    # A distant unrelated machine (a compressor, say): low tones and low-passed noise.
    # Its place and speed belong to the installation (unit), its phases and noise to the
    # recording; one stream serves both when they are the same seed, as it always did.
    site = _rng(scene.unit_seed, "background", "distant")
    r = site if scene.unit_seed == seed else _rng(seed, "background", "distant")
    # Placed around mic 0, which stays where it is when microphones are added.
    centre = scene.mics[0]
    angle, dist = site.uniform(0, 2 * np.pi), site.uniform(12.0, 25.0)
    position = (centre[0] + dist * math.cos(angle), centre[1] + dist * math.sin(angle), 1.0)
    shaft = site.uniform(15.0, 22.0)
    pre = _pre_roll(scene)
    t = np.arange(pre + n) / sr
    phase = 2 * np.pi * shaft * t
    hum = sum(0.5 / k * np.sin(k * phase + r.uniform(0, 2 * np.pi)) for k in range(1, 7))
    hum = hum + 0.5 * np.sin(2 * np.pi * 2 * scene.line_hz * t + r.uniform(0, 2 * np.pi))
    hum = hum + 0.8 * _shaped_noise(r, pre + n, sr, lambda f: _band(f, 20.0, 300.0))
    distant, _ = _propagate(DISTANT_MACHINE_RMS * hum, _paths(scene, position, "_distant"), sr, pre + n)
    distant = _and_references(scene, distant, DISTANT_MACHINE_RMS * hum, position, "_distant", pre + n)
    out += distant[:, pre:]

    # Knocks, clanks and forklift beeps at random places and times.
    r = _rng(seed, "background", "events")
    count = int(r.poisson(scene.event_rate_hz * scene.seconds))
    events = []
    for i in range(count):
        kind = str(r.choice(EVENT_KINDS, p=EVENT_PROBABILITY))
        start = r.uniform(0, scene.seconds)
        angle, dist, height = r.uniform(0, 2 * np.pi), r.uniform(3.0, 15.0), r.uniform(0.2, 2.5)
        where = (centre[0] + dist * math.cos(angle), centre[1] + dist * math.sin(angle), height)
        sound, info = _event(kind, _rng(seed, "background", "event", i), sr)
        paths = _paths(scene, where, f"_event{i}")
        heard, _ = _propagate(sound, paths, sr, sound.size + _paths_extra(scene, where, sr))
        i0 = round(start * sr)
        take = min(heard.shape[1], n - i0)
        out[:mics, i0:i0 + take] += heard[:, :take]
        if scene.references:
            paths = _paths(scene, where, f"_event{i}", references=True)
            heard, _ = _propagate(sound, paths, sr, sound.size + _paths_extra(scene, where, sr, references=True))
            take = min(heard.shape[1], n - i0)
            out[mics:, i0:i0 + take] += heard[:, :take]
        events.append({"kind": kind, "time_s": start, "position": list(where), **info})  # at the source

    labels = {
        "kind": "factory",
        "diffuse_noise": {"colour": "pink, brown below 100 Hz", "rms": BACKGROUND_RMS,
                          "level_std_db": BACKGROUND_LEVEL_STD_DB},
        "distant_machine": {"position": list(position), "shaft_hz": shaft,
                            "rms_at_1m": DISTANT_MACHINE_RMS},
        "events": events,
    }
    return out, labels


def _event(kind: str, rng: np.random.Generator, sr: int) -> tuple[np.ndarray, dict]:
    """One transient at 1 m, float64 shape = (samples,), peak ``EVENT_PEAK[kind]``."""
    if kind == "knock":  # a dull thump with a short click on top
        f, decay = rng.uniform(80.0, 250.0), rng.uniform(0.02, 0.06)
        n = round(6 * decay * sr)
        t = np.arange(n) / sr
        x = np.exp(-t / decay) * np.sin(2 * np.pi * f * t) + 0.5 * np.exp(-t / 0.002) * rng.standard_normal(n)
        info = {"frequency_hz": f}
    elif kind == "clank":  # struck steel: inharmonic modes of a free bar
        f, decay = rng.uniform(300.0, 900.0), rng.uniform(0.08, 0.3)
        n = round(5 * decay * sr)
        t = np.arange(n) / sr
        x = np.zeros(n)
        for ratio, amp, shorter in [(1.0, 1.0, 1.0), (2.76, 0.6, 0.7), (5.40, 0.4, 0.5), (8.93, 0.25, 0.35)]:
            offset = rng.uniform(0, 2 * np.pi)
            if ratio * f < TONE_LIMIT * sr:
                x += amp * np.exp(-t / (decay * shorter)) * np.sin(2 * np.pi * ratio * f * t + offset)
        info = {"frequency_hz": f}
    else:  # forklift reversing alarm: ~1 beep per second, square-ish tone
        f, beeps = rng.uniform(1000.0, 1300.0), int(rng.integers(3, 8))
        n = round(beeps * sr)
        t = np.arange(n) / sr
        odd = [(k, a) for k, a in [(1, 1.0), (3, 0.3), (5, 0.15)] if k * f < TONE_LIMIT * sr]
        tone = sum(a * np.sin(2 * np.pi * k * f * t) for k, a in odd)
        on = (t % 1.0) < 0.5
        x = tone * _moving_average(on.astype(float), max(1, round(0.01 * sr)))
        info = {"frequency_hz": f, "beeps": beeps}
    return EVENT_PEAK[kind] * x / np.max(np.abs(x)), info


# ======================================================================================
# Intermittent noise
# ======================================================================================
def _render_intermittent(scene: Scene) -> tuple[Optional[np.ndarray], Optional[dict]]:
    """The intermittent source at every mic and then every reference mic, float64 shape
    = (mics + references, samples), and its labels; (None, None) without one.

    Its design (the tone) comes from the unit, everything else from the seed; all of it
    from streams of its own, so the machines and the background do not change with it.
    """
    noise = scene.intermittent
    if noise is None:
        return None, None
    n, sr, seed = scene.samples, scene.sample_rate, scene.seed
    pre = _pre_roll(scene)
    length = pre + n  # the timeline starts pre samples before t = 0, like the machines'
    tone_hz = float(_rng(scene.unit_seed, INTERMITTENT, "design").uniform(*INTERMITTENT_TONE_HZ))
    if noise.tone_hz is not None:
        tone_hz = noise.tone_hz

    spells = _spells(noise, seed, scene.seconds)
    gate = _gate([(pre + round(a * sr), pre + round(b * sr)) for a, b, on in spells if on], length, sr)
    # Clipped at MAX_DRIFT_STD standard deviations: within +-level_drift_db.
    level = 10 ** (_slow_walk(_rng(seed, INTERMITTENT, "level"), length, sr, noise.level_drift_db / MAX_DRIFT_STD,
                              INTERMITTENT_LEVEL_TAU_S) / 20)
    wander = _slow_walk(_rng(seed, INTERMITTENT, "tone"), length, sr, noise.tone_drift, INTERMITTENT_TONE_TAU_S)
    phase = (2 * np.pi / sr) * np.cumsum(tone_hz * (1 + wander))
    sound = _rng(seed, INTERMITTENT, "sound")
    x = np.zeros(length)
    harmonics = []
    for order, amp in INTERMITTENT_TONES:
        offset = sound.uniform(0, 2 * np.pi)  # drawn whether the harmonic is kept or not
        if order * tone_hz * (1 + MAX_DRIFT_STD * noise.tone_drift) < TONE_LIMIT * sr:
            x += amp * np.sin(order * phase + offset)
            harmonics.append(order)
    # Broadband noise whose tilt drifts: the balance of a rumble and a hiss (independent,
    # unit RMS each) walks, their summed power stays the same.
    hiss_band = (INTERMITTENT_HISS_HZ[0], min(INTERMITTENT_HISS_HZ[1], TONE_LIMIT * sr))
    rumble = _shaped_noise(sound, length, sr, lambda f: _band(f, *INTERMITTENT_RUMBLE_HZ))
    hiss = _shaped_noise(sound, length, sr, lambda f: _band(f, *hiss_band))
    tilt = INTERMITTENT_TILT_DB + _slow_walk(_rng(seed, INTERMITTENT, "tilt"), length, sr, noise.tilt_drift_db,
                                             INTERMITTENT_TILT_TAU_S)
    balance = 10 ** (tilt / 20)
    tone_power = sum(a * a / 2 for _, a in INTERMITTENT_TONES)
    x += math.sqrt(1 - tone_power) * (balance * rumble + hiss) / np.sqrt(1 + balance ** 2)
    x = _soft_limit(x, INTERMITTENT_KNEE, INTERMITTENT_CREST)
    rms = MACHINE_RMS * 10 ** (noise.level_db / 20)
    x *= rms * level * gate

    heard, _ = _propagate(x, _paths(scene, noise.position, INTERMITTENT), sr, length)
    heard = _and_references(scene, heard, x, noise.position, INTERMITTENT, length)

    def within(state):
        return [[max(a, 0.0), min(b, scene.seconds)] for a, b, on in spells
                if on == state and b > 0 and a < scene.seconds]

    at_mics = [_distance(noise.position, m) for m in scene.mics]
    at_refs = [_distance(noise.position, m) for m in scene.references]
    labels = {
        "kind": "ventilation fan or compressor",
        "position": list(noise.position),
        "level_db": noise.level_db,  # re MACHINE_RMS at 1 m, while on
        "rms_at_1m": rms,
        # Spells at the source, s from the start of the clip (heard delay_s later); the
        # fades (fade_s) lie inside the spells on.
        "on_s": within(True),
        "off_s": within(False),
        "fade_s": FAULT_RAMP_S,
        "durations": noise.durations,
        "mean_on_s": noise.mean_on_s,
        "mean_off_s": noise.mean_off_s,
        "level_drift_db": noise.level_drift_db,
        "level_tau_s": INTERMITTENT_LEVEL_TAU_S,
        "tone_hz": tone_hz,
        "harmonics": harmonics,
        "tone_drift": noise.tone_drift,
        "tone_tau_s": INTERMITTENT_TONE_TAU_S,
        "rumble_hz": list(INTERMITTENT_RUMBLE_HZ),
        "hiss_hz": list(hiss_band),
        "tilt_db": INTERMITTENT_TILT_DB,  # rumble over hiss, on average
        "tilt_drift_db": noise.tilt_drift_db,
        "tilt_tau_s": INTERMITTENT_TILT_TAU_S,
        "distance_m": at_mics,
        "delay_s": [d / SPEED_OF_SOUND for d in at_mics],
        "reference_distance_m": at_refs,
        "reference_delay_s": [d / SPEED_OF_SOUND for d in at_refs],
    }
    return heard[:, pre:], labels


def _spells(noise: IntermittentNoise, seed: int, seconds: float) -> list[tuple[float, float, bool]]:
    """The intermittent source's spells, (start, end, on) in s at the source, in order,
    from before the longest pre-roll to past the end of the clip. Drawn outwards from
    t = 0 (forwards and backwards from their own streams), so that neither the pre-roll
    (the reverb) nor the clip's length moves them."""
    def length(rng, on):
        mean = noise.mean_on_s if on else noise.mean_off_s
        if noise.durations == "uniform":
            return float(rng.uniform(0.5 * mean, 1.5 * mean))
        return INTERMITTENT_MIN_SPELL_S + float(rng.exponential(mean - INTERMITTENT_MIN_SPELL_S))

    now = _rng(seed, INTERMITTENT, "spells")
    on = bool(now.random() < noise.mean_on_s / (noise.mean_on_s + noise.mean_off_s))
    first, into = length(now, on), float(now.random())
    spells = [(-into * first, (1 - into) * first, on)]
    state, t = on, spells[-1][1]
    while t < seconds:
        state = not state
        d = length(now, state)
        spells.append((t, t + d, state))
        t += d
    before = _rng(seed, INTERMITTENT, "spells", "before")
    earlier = []
    state, t = on, spells[0][0]
    while t > -(PRE_ROLL_S + MAX_RT60_S):
        state = not state
        d = length(before, state)
        earlier.append((t - d, t, state))
        t -= d
    return earlier[::-1] + spells


def _soft_limit(x: np.ndarray, knee: float, ceiling: float) -> np.ndarray:
    """``x`` unchanged up to +-``knee``, above it bent smoothly (tanh) towards +-``ceiling``."""
    over = np.abs(x) - knee
    bent = knee + (ceiling - knee) * np.tanh(np.maximum(over, 0.0) / (ceiling - knee))
    return np.where(over > 0, np.sign(x) * bent, x)


def _gate(spells: Sequence[tuple[int, int]], n: int, sr: int) -> np.ndarray:
    """1 inside the spells [i0, i1) (samples, may reach outside [0, n)), 0 outside, with
    the faults' raised-cosine fades inside each spell, shape = (n,)."""
    env = np.zeros(n)
    for i0, i1 in spells:
        lo, hi = max(i0, 0), min(i1, n)
        if lo >= hi:
            continue
        env[lo:hi] = 1.0
        ramp = min(round(FAULT_RAMP_S * sr), (i1 - i0) // 2)
        if ramp > 0:
            rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
            for start, shape in ((i0, rise), (i1 - ramp, rise[::-1])):
                idx = np.arange(start, start + ramp)
                keep = (idx >= 0) & (idx < n)
                env[idx[keep]] = shape[keep]
    return env


# ======================================================================================
# Propagation
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class _Direct:
    distance: float  # m
    gain: float  # 1/r, clamped


@dataclasses.dataclass(frozen=True)
class _Paths:
    """How one source reaches every microphone."""

    direct: tuple[_Direct, ...]
    tails: Optional[tuple[np.ndarray, ...]]  # unit-energy reverb tail per mic
    reverb_gain: float  # of the tails, relative to the direct sound at 1 m


def _paths(scene: Scene, source: Sequence[float], key: str, references: bool = False) -> _Paths:
    """How a source reaches the microphones, or with ``references`` the reference
    microphones (their reverb tails are their own draws)."""
    receivers = scene.references if references else scene.mics
    direct = tuple(
        _Direct(d, REFERENCE_DISTANCE_M / max(d, NEAR_FIELD_M))
        for d in (_distance(source, mic) for mic in receivers)
    )
    rt60 = scene.reverb_rt60_s
    if rt60 is None:
        return _Paths(direct, None, 0.0)
    n = _tail_samples(scene)
    t = np.arange(n) / scene.sample_rate
    envelope = 10 ** (-3 * t / rt60)  # -60 dB at RT60
    tails = []
    for m in range(len(receivers)):
        stream = (_rng(scene.unit_seed, "reverb", key, "reference", m) if references
                  else _rng(scene.unit_seed, "reverb", key, m))
        h = stream.standard_normal(n) * envelope  # the room's own
        tails.append(h / np.sqrt(np.sum(h**2)))
    # Reverberant energy equals direct energy at the critical distance (Sabine).
    critical = 0.057 * math.sqrt(ROOM_VOLUME_M3 / rt60)
    return _Paths(direct, tuple(tails), REFERENCE_DISTANCE_M / critical)


def _tail_samples(scene: Scene) -> int:
    return 0 if scene.reverb_rt60_s is None else round(scene.reverb_rt60_s * scene.sample_rate)


def _paths_extra(scene: Scene, source: Sequence[float], sr: int, references: bool = False) -> int:
    """Samples a sound gets longer on its way to the farthest microphone (or reference
    microphone)."""
    far = max(_distance(source, mic) for mic in (scene.references if references else scene.mics))
    return math.ceil((far / SPEED_OF_SOUND + REVERB_PREDELAY_S) * sr) + _tail_samples(scene)


def _and_references(scene: Scene, at_mics: np.ndarray, x: np.ndarray, source: Sequence[float], key: str,
                    n_out: int) -> np.ndarray:
    """``at_mics`` (``_propagate``'s output for ``x`` from ``source``) with the rows of the
    reference microphones appended, shape = (mics + references, n_out). Propagated
    separately, so the microphones' rows are what they are without references."""
    if not scene.references:
        return at_mics
    at_refs, _ = _propagate(x, _paths(scene, source, key, references=True), scene.sample_rate, n_out)
    return np.concatenate([at_mics, at_refs])


def _propagate(x: np.ndarray, paths: _Paths, sr: int, n_out: int,
               reference: Optional[np.ndarray] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A mono source at every microphone: fractional delay, 1/r, reverb tail.

    Parameters
    ----------
    x : numpy.ndarray
        float64, shape = (samples,), the source at 1 m.
    n_out : int
        Samples kept from the start of ``x``'s timeline.
    reference : numpy.ndarray, optional
        Another source signal (same length) to propagate to mic 0 only.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray or None)
        float64 shape = (mics, n_out), and ``reference`` at mic 0, shape = (n_out,).
    """
    from scipy import fft

    far = max(p.distance for p in paths.direct)
    tail = 0 if paths.tails is None else paths.tails[0].size
    # Long enough that nothing wraps around: the latest arrival plus the reverb tail.
    latest = math.ceil((far / SPEED_OF_SOUND + REVERB_PREDELAY_S) * sr)
    nfft = fft.next_fast_len(max(n_out, x.size) + latest + tail + FFT_MARGIN, real=True)
    f = fft.rfftfreq(nfft, 1 / sr)
    spectrum = fft.rfft(x, nfft)
    ref_spectrum = None if reference is None else fft.rfft(reference, nfft)
    out = np.empty((len(paths.direct), n_out))
    ref_out = None
    for m, direct in enumerate(paths.direct):
        delay = np.exp(-2j * np.pi * f * (direct.distance / SPEED_OF_SOUND))
        h = direct.gain * delay
        if paths.tails is not None:
            late = np.exp(-2j * np.pi * f * REVERB_PREDELAY_S)
            h += paths.reverb_gain * fft.rfft(paths.tails[m], nfft) * delay * late
        out[m] = fft.irfft(spectrum * h, nfft)[:n_out]
        if m == 0 and ref_spectrum is not None:
            ref_out = fft.irfft(ref_spectrum * h, nfft)[:n_out]
    return out, ref_out


# ======================================================================================
# Files
# ======================================================================================
def write_rendering(rendering: Rendering, out_dir: Path) -> Path:
    """Write ``mixture.wav``, ``stems/<name>.wav``, ``stems/_background.wav``,
    ``stems/_intermittent.wav`` (with an intermittent source) and, last, ``labels.json``
    into ``out_dir`` (made if missing; same-named files are replaced).

    WAV files are 32-bit float, lossless for the float32 arrays: the stems (frames,
    mics), the mixture (frames, mics + references), the reference microphones' columns
    last (labels.json ``channels``: the 1-based columns of each).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    StorageError
        A file cannot be written; the message names it.
    """
    out_dir = Path(out_dir)
    try:
        (out_dir / "stems").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(out_dir / "stems", e) from None
    sr = rendering.sample_rate
    mixture = rendering.mixture
    if rendering.reference.shape[0]:
        mixture = np.concatenate([mixture, rendering.reference])
    _write_wav(out_dir / "mixture.wav", mixture, sr)
    stems = {}
    for name, stem in _stems(rendering):
        stems[name] = f"stems/{name}.wav"
        _write_wav(out_dir / stems[name], stem, sr)
    files = {"mixture": "mixture.wav", "stems": stems, "format": "WAV, 32-bit float, full scale 1.0"}
    write_json(out_dir / "labels.json", {**rendering.labels, "files": files})
    return out_dir


def rendering_files(out_dir: Path, rendering: Rendering) -> list[Path]:
    """The files ``write_rendering`` writes, mixture first, labels last."""
    out_dir = Path(out_dir)
    stems = [out_dir / "stems" / f"{name}.wav" for name, _ in _stems(rendering)]
    return [out_dir / "mixture.wav", *stems, out_dir / "labels.json"]


def _stems(rendering: Rendering) -> list[tuple[str, np.ndarray]]:
    """(name, array at the mics) of each stem file: the machines, the background and the
    intermittent source if the scene has one."""
    stems = [*rendering.stems.items(), (BACKGROUND, rendering.background)]
    if rendering.labels.get("intermittent") is not None:
        stems.append((INTERMITTENT, rendering.intermittent))
    return stems


def write_training_set(
    out_dir: Path,
    sources: Sequence[str] = MACHINE_TYPES,
    clips_per_source: int = 20,
    seconds: float = DEFAULT_SECONDS,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    seed: int = 0,
    noise_clips: int = 10,
    fault_fraction: float = 0.0,
    line_hz: float = DEFAULT_LINE_HZ,
    n_mics: Optional[int] = None,
    unit: Optional[int] = None,
) -> Path:
    """Write isolated recordings per machine type for separator training.

    Layout (see the module docstring): ``out_dir/<type>/sim-<seed>-<NNNN>[-<fault>].wav``,
    ``out_dir/_noise/sim-<seed>-<NNNN>.wav`` and ``out_dir/simulated-seed<seed>.json``
    (written last). Each clip is one machine alone at one microphone, drawn per clip:
    0.5-4 m away, gain -6..+6 dB, its own speed and design, free field or RT60
    0.2-1.2 s (half each), with a fault in ``fault_fraction`` of the clips. WAV files are
    mono 32-bit float.

    With ``n_mics``: training data for an array separator (``train_separator.array``),
    recorded in one installation. Each clip is one machine alone recorded on the
    ``default_scene`` array of ``n_mics`` microphones, from where that scene puts a
    machine of its type (the order of ``sources``) give or take ``ARRAY_JITTER_M``, in
    that scene's room (free field), one channel per microphone; the background clips
    are the room at every microphone.

    With ``unit``: every clip records the machines of that one installation (``Scene.unit``:
    each type's design and operating point, the room's reverberation and distant
    machine), as a user records their own machines to train a separator for them; only
    the recording, the placement and the gain change from clip to clip.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    sources = tuple(sources)
    if not sources or any(s not in MACHINE_TYPES for s in sources) or len(set(sources)) != len(sources):
        raise ConfigError(f"sources {', '.join(sources) or 'none'}: list each of "
                          f"{', '.join(MACHINE_TYPES)} at most once, at least one.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed {seed!r}: must be an integer >= 0.")
    if clips_per_source < 1 or noise_clips < 0:
        raise ConfigError("clips: need at least 1 clip per source and 0 or more noise clips.")
    if not 0 <= fault_fraction <= 1:
        raise ConfigError(f"fault_fraction {fault_fraction}: must be in [0, 1].")
    if n_mics is None:
        mic = ((0.0, 0.0, MIC_HEIGHT_M),)
        placed = {}
    else:
        layout = default_scene(machines=sources, n_mics=n_mics)
        mic = layout.mics
        placed = {m.kind: m.position for m in layout.machines}
    manifest = {"format": 1, "generator": f"signalcraft.simulate {__version__}", "seed": seed, "unit": unit,
                "sample_rate": sample_rate, "seconds": seconds, "clips": []}

    def draw(*key):
        """One clip's placement; the same draws whatever branch is taken."""
        r = _rng(seed, "training", *key)
        angle, dist = r.uniform(0, 2 * np.pi), r.uniform(0.5, 4.0)
        rt60 = r.uniform(0.2, 1.2)
        position = (dist * math.cos(angle), dist * math.sin(angle), MACHINE_HEIGHT_M)
        reverberant = r.random() < 0.5
        return int(r.integers(2**31)), position, r.uniform(-6.0, 6.0), rt60 if reverberant and not placed else None, r

    jobs: list[tuple[Path, Scene, Optional[str]]] = []
    for source in sources:
        allowed = [k for k, kinds in FAULTS.items() if source in kinds]
        for i in range(clips_per_source):
            clip_seed, position, gain, rt60, r = draw(source, i)
            if source in placed:  # where it stands in the room, give or take a little
                position = tuple(p + d for p, d in zip(placed[source], r.uniform(-ARRAY_JITTER_M, ARRAY_JITTER_M, 3)))
            u, kind = r.random(), allowed[int(r.integers(len(allowed)))]
            start = r.uniform(0, seconds / 2)
            end = r.uniform(start + seconds / 4, seconds)
            faults = (Fault(kind, start, end),) if u < fault_fraction else ()
            name = f"sim-{seed}-{i:04d}" + (f"-{kind}" if faults else "") + ".wav"
            machine = Machine(source, source, position, faults, gain_db=gain)
            scene = Scene((machine,), mic, seconds, sample_rate, None, rt60, clip_seed, line_hz, unit=unit)
            jobs.append((out_dir / source / name, scene, source))
    for i in range(noise_clips):
        clip_seed, _, _, rt60, _ = draw(NOISE_DIR, i)
        scene = Scene((), mic, seconds, sample_rate, None, rt60, clip_seed, line_hz, unit=unit)
        jobs.append((out_dir / NOISE_DIR / f"sim-{seed}-{i:04d}.wav", scene, None))

    for path, scene, source in jobs:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(path.parent, e) from None
        if source is None:
            audio, _ = _render_background(scene)
            entry: dict[str, Any] = {"source": NOISE_DIR}
        else:
            stems, _, labels = _render_machines(scene)
            audio = stems[source]
            m = labels[0]
            entry = {"source": source, "distance_m": m["distance_m"][0], "gain_db": m["gain_db"],
                     "parameters": m["parameters"], "faults": m["faults"]}
        _write_wav(path, (audio if n_mics else audio[0]).astype(np.float32), sample_rate)
        # scene_seed re-renders the clip: Scene(..., seed=scene_seed) with these settings.
        manifest["clips"].append({"file": path.relative_to(out_dir).as_posix(), "scene_seed": scene.seed,
                                  "reverb_rt60_s": scene.reverb_rt60_s, **entry})
    write_json(out_dir / f"simulated-seed{seed}.json", manifest)
    return out_dir


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """float32 audio, shape = (channels, samples) or (samples,), as 32-bit float WAV."""
    import soundfile as sf

    frames = audio.T if audio.ndim == 2 else audio  # soundfile wants (frames, channels)
    # The temporary name has no .wav suffix: the format is given explicitly.
    return atomic_write(path, lambda tmp: sf.write(str(tmp), frames, sample_rate, subtype="FLOAT",
                                                   format="WAV"))


# ======================================================================================
# Command line
# ======================================================================================
def parse_machines(text: str) -> tuple[str, ...]:
    """``"pump,fan,pump"`` -> ``("pump", "fan", "pump")``; ``"none"`` -> ``()``."""
    if text.strip().lower() == "none":
        return ()
    kinds = tuple(k.strip().lower() for k in text.split(","))
    for kind in kinds:
        if kind not in MACHINE_TYPES:
            raise ConfigError(f"--machines {text!r}: unknown machine type {kind!r}. "
                              f"Use a comma-separated list of {', '.join(MACHINE_TYPES)}, or 'none'.")
    return kinds


_FAULT_SPEC = re.compile(
    r"(?P<name>[^:@\s]+):(?P<kind>[^:@\s]+)(?:@(?P<start>[^-\s]*)-(?P<end>[^-\s]*))?"
)


def parse_fault(spec: str) -> tuple[str, Fault]:
    """``"pump:bearing@4-10"`` -> ``("pump", Fault("bearing", 4.0, 10.0))``.

    Either time may be left out (``@4-``: from 4 s to the end); without ``@`` the fault
    lasts the whole clip.
    """
    how = "NAME:KIND[@START-END], e.g. pump:bearing@4-10"
    m = _FAULT_SPEC.fullmatch(spec.strip())
    if m is None:
        raise ConfigError(f"--fault {spec!r}: expected {how}.")
    if m["kind"] not in FAULTS:
        raise ConfigError(f"--fault {spec!r}: unknown fault kind {m['kind']!r}. "
                          f"Known kinds: {', '.join(FAULTS)}.")
    try:
        start = float(m["start"]) if m["start"] else 0.0
        end = float(m["end"]) if m["end"] else None
    except ValueError:
        raise ConfigError(f"--fault {spec!r}: START and END are seconds; expected {how}.") from None
    try:
        return m["name"], Fault(m["kind"], start, end)
    except ConfigError as e:
        raise ConfigError(f"--fault {spec!r}: {e}") from None


def parse_snr(text: str) -> Optional[float]:
    """``"-6"`` -> -6.0; ``"none"`` -> None (background at its nominal level)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"--snr {text!r}: expected a number of dB (e.g. -6, 0, 6) or 'none'.")
    return value


def from_options(
    out: Path,
    *,
    training_set: bool = False,
    machines: Optional[str] = None,
    mics: Optional[int] = None,
    faults: Sequence[str] = (),
    snr: Optional[str] = None,
    reverb: Optional[float] = None,
    seconds: Optional[float] = None,
    sample_rate: Optional[int] = None,
    seed: Optional[int] = None,
    unit: Optional[int] = None,
    line_hz: Optional[float] = None,
    clips: Optional[int] = None,
    intermittent: bool = False,
    references: Optional[int] = None,
) -> list[Path]:
    """`signalcraft simulate`: options as typed (None: not given, the defaults here
    apply), one scene or a training set written to ``out``. Returns the paths written:
    a scene's files, or the training set's folders.

    ``intermittent``: add ``default_scene``'s intermittent noise source; ``references``:
    that many reference microphones next to where it stands (with or without it), as the
    last columns of mixture.wav.

    Raises
    ------
    ConfigError
        A bad or contradictory option; the message names it.
    """
    common = _given(seconds=seconds, sample_rate=sample_rate, seed=seed, unit=unit, line_hz=line_hz)
    kinds = parse_machines(machines) if machines is not None else None
    if training_set:
        scene_only = [opt for opt, v in (("--fault", faults), ("--snr", snr), ("--reverb", reverb),
                                         ("--intermittent", intermittent), ("--references", references)) if v]
        if scene_only:
            raise ConfigError(f"{', '.join(scene_only)}: describe one scene; leave them out with "
                              "--training-set (its clips draw their own distances and rooms; with --mics "
                              "each machine stands where the default room puts it).")
        folder = write_training_set(out, **_given(sources=kinds, clips_per_source=clips, n_mics=mics), **common)
        return [folder / s for s in (kinds or MACHINE_TYPES)] + [folder / NOISE_DIR]
    if clips is not None:
        raise ConfigError("--clips: applies only with --training-set.")
    options = dict(common, **_given(reverb_rt60_s=reverb, n_mics=mics, machines=kinds, references=references))
    if intermittent:
        options["intermittent"] = True
    if snr is not None:
        options["snr_db"] = parse_snr(snr)
    elif kinds == ():
        options["snr_db"] = None  # the room alone has no SNR
    names = machine_names(DEFAULT_MACHINES if kinds is None else kinds)
    parsed = []
    for spec in faults:
        name, fault = parse_fault(spec)
        if name not in names:
            raise ConfigError(f"--fault {spec!r}: no machine named {name!r}; the machines are "
                              f"{', '.join(names) or 'none'} (see --machines).")
        parsed.append((name, fault))
    scene = default_scene(faults=parsed, **options)
    rendering = render(scene)
    write_rendering(rendering, out)
    return rendering_files(out, rendering)


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


# ======================================================================================
# Signal helpers
# ======================================================================================
def _rng(*key: Union[int, str]) -> np.random.Generator:
    """A generator for a named stream: ``_rng(seed, "machine", "pump")``. Streams with
    different keys are independent; the same key always gives the same stream."""
    return np.random.default_rng(np.random.SeedSequence([_key(k) for k in key]))


def _seed_int(*key: Union[int, str]) -> int:
    return int(np.random.SeedSequence([_key(k) for k in key]).generate_state(2, np.uint32).view(np.uint64)[0])


def _key(k: Union[int, str]) -> int:
    return zlib.crc32(k.encode()) if isinstance(k, str) else int(k)


def _point(p: Sequence[float], what: str) -> tuple[float, float, float]:
    try:
        point = tuple(float(v) for v in p)
    except (TypeError, ValueError):
        point = ()
    if len(point) != 3 or not all(math.isfinite(v) for v in point):
        raise ConfigError(f"{what}: expected three finite coordinates (x, y, z) in metres, got {p!r}.")
    return point  # type: ignore[return-value]


def _distance(a: Sequence[float], b: Sequence[float]) -> float:
    return math.dist(a, b)


def _db(power_ratio: float) -> float:
    return float(10 * np.log10(power_ratio))


def _lfilter(b, a, x):
    from scipy.signal import lfilter

    return lfilter(b, a, x)


def _slow_walk(rng: np.random.Generator, n: int, sr: int, std: float, tau_s: float) -> np.ndarray:
    """A smooth stationary random walk (Ornstein-Uhlenbeck at ``CONTROL_RATE_HZ``,
    linearly interpolated), shape = (n,), standard deviation ``std``, clipped at
    ``MAX_DRIFT_STD`` std."""
    steps = math.ceil(n / sr * CONTROL_RATE_HZ) + 2
    a = math.exp(-1 / (tau_s * CONTROL_RATE_HZ))
    start, kicks = rng.standard_normal(), rng.standard_normal(steps)
    walk = _lfilter([std * math.sqrt(1 - a * a)], [1.0, -a], kicks, ) if std else np.zeros(steps)
    walk = walk + std * start * a ** np.arange(1, steps + 1)  # begin in the stationary state
    walk = np.clip(walk, -MAX_DRIFT_STD * std, MAX_DRIFT_STD * std)
    return np.interp(np.arange(n) / sr, np.arange(steps) / CONTROL_RATE_HZ, walk)


def _harmonics(d: _Drive, phase: np.ndarray, orders: Sequence[tuple[float, float]],
               rng: np.random.Generator) -> np.ndarray:
    """Sum of amp * sin(order * phase + random phase); orders that would come near the
    Nyquist frequency at the highest drift are left out (the phase is still drawn)."""
    x = np.zeros(phase.size)
    for order, amp in orders:
        offset = rng.uniform(0, 2 * np.pi)
        if order * d.shaft_hz * 1.05 < TONE_LIMIT * d.sr:
            x += amp * np.sin(order * phase + offset)
    return x


def _shaped_noise(rng: np.random.Generator, n: int, sr: int, magnitude) -> np.ndarray:
    """Gaussian noise with the amplitude spectrum ``magnitude(f)`` (f in Hz), scaled by
    its expected RMS (a fixed factor, not the draw's), shape = (n,)."""
    from scipy import fft

    nfft = fft.next_fast_len(n, real=True)
    f = fft.rfftfreq(nfft, 1 / sr)
    shape = magnitude(f)
    shape[0] = 0.0
    # Power of the full (two-sided) spectrum: DC once, Nyquist once when nfft is even.
    expected = math.sqrt((2 * np.sum(shape**2) - (shape[-1] ** 2 if nfft % 2 == 0 else 0.0)) / nfft)
    return fft.irfft(fft.rfft(rng.standard_normal(nfft)) * shape, nfft)[:n] / expected


def _band(f: np.ndarray, lo: float, hi: float, order: int = 2) -> np.ndarray:
    """Butterworth-like band-pass magnitude between ``lo`` and ``hi`` Hz."""
    f = np.maximum(f, 1e-6)
    return 1 / np.sqrt((1 + (lo / f) ** (2 * order)) * (1 + (f / hi) ** (2 * order)))


def _ring(kicks: np.ndarray, freq: float, decay_s: float, sr: int) -> np.ndarray:
    """Each kick rings a resonance: impulse response r**n * sin((n + 1) w), peak ~1,
    amplitude 1/e after ``decay_s``."""
    r = math.exp(-1 / (decay_s * sr))
    w = 2 * np.pi * freq / sr
    return _lfilter([math.sin(w)], [1.0, -2 * r * math.cos(w), r * r], kicks)


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average, shape = x.shape (smooths on/off steps into ramps)."""
    c = np.concatenate([[0.0], np.cumsum(np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"))])
    return (c[width:] - c[:-width]) / width


def _fade(window: int, sr: int) -> np.ndarray:
    """Raised-cosine fade in and out over ``FAULT_RAMP_S`` of a ``window``-sample fault,
    shape = (window,)."""
    env = np.ones(window)
    ramp = min(round(FAULT_RAMP_S * sr), window // 2)
    if ramp > 0:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        env[:ramp] = rise
        env[window - ramp:window] = rise[::-1]
    return env
