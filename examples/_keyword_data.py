"""Spoken keywords synthesised with espeak-ng: clips for training and long streams for testing.

Ten keywords (the commands of the Speech Commands set), an "unknown word" class (forty other
words) and a silence/noise class. Each word is rendered by ``espeak-ng`` with many voices: an
accent (eight English ones) combined with a voice variant (espeak-ng's ``+variant`` voices), at a
random speed and pitch. Training and test use **disjoint variants** (``TRAIN_VARIANTS`` and
``TEST_VARIANTS``), so the test voices are never heard in training. Noise (white, pink, brown,
hum and babble of other words) is added at chosen signal-to-noise ratios.

The clean utterances are rendered once and cached as int16 arrays (``.npz``); the noise and the
placement in time are drawn afresh for every clip. Needs the ``espeak-ng`` program
(``apt-get install espeak-ng``) and scipy (resampling from 22.05 kHz to 16 kHz).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree",
                 "wow", "learn", "follow", "forward", "backward", "visual", "apple", "table",
                 "water", "music", "window", "yellow", "purple", "number", "later", "morning",
                 "garden", "station", "basket", "pencil", "rocket")
CLASSES = (*KEYWORDS, "_unknown_", "_silence_")
UNKNOWN, SILENCE = len(KEYWORDS), len(KEYWORDS) + 1
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-us-nyc")
# Every espeak-ng voice variant except the test ones and their near relatives (iven2-4, steph2-3,
# anikaRobot) and "Mr serious" (a space in its name).
TRAIN_VARIANTS = ("m1", "m2", "m4", "m5", "m7", "m8", "f1", "f2", "f4", "klatt", "klatt3", "klatt4",
                  "klatt5", "klatt6", "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy",
                  "Demonic", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Jacky", "Lee", "Marco",
                  "Mario", "Michael", "Mike", "Nguyen", "RicishayMax", "RicishayMax2",
                  "RicishayMax3", "Storm", "Tweaky", "UniRobot", "announcer", "antonio", "aunty",
                  "belinda", "boris", "croak", "david", "ed", "edward", "edward2", "fast",
                  "grandma", "grandpa", "gustave", "john", "kaukovalta", "linda", "marcelo", "max",
                  "miguel", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert",
                  "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6",
                  "robosoft7", "robosoft8", "sandro", "shelby", "whisper", "whisperf")
TEST_VARIANTS = ("m3", "m6", "f3", "f5", "klatt2", "Hugo", "adam", "anika", "benjamin",
                 "caleb", "iven", "michel", "steph", "travis", "victor", "zac")


def have_espeak() -> bool:
    """Whether the ``espeak-ng`` program is installed."""
    return shutil.which("espeak-ng") is not None


def speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """``word`` rendered by espeak-ng, float32 in [-1, 1] at 16 kHz, silence trimmed."""
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "-w", str(path), word], check=True, capture_output=True)
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    x = pcm.astype(np.float32) / 32768.0
    if rate != SAMPLE_RATE:
        g = np.gcd(rate, SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(1e-6, np.abs(x).max()))
    return x[loud[0]:loud[-1] + 1] if loud.size else x


@dataclass
class Utterances:
    """Clean utterances: audio (a list of float32 arrays), class ids, word ids and voices."""

    audio: list
    labels: np.ndarray
    words: list
    voices: list

    def of_class(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.labels == c)


def render_set(variants: tuple[str, ...], per_keyword: int, unknown: int, seed: int,
               log=None) -> Utterances:
    """``per_keyword`` renders of each keyword and ``unknown`` renders of other words."""
    rng = np.random.default_rng(seed)
    jobs = [(w, i) for i, w in enumerate(KEYWORDS) for _ in range(per_keyword)]
    jobs += [(str(rng.choice(UNKNOWN_WORDS)), UNKNOWN) for _ in range(unknown)]
    audio, labels, words, voices = [], [], [], []
    for n, (word, label) in enumerate(jobs):
        voice = f"{rng.choice(ACCENTS)}+{rng.choice(variants)}"
        speed, pitch = int(rng.integers(110, 230)), int(rng.integers(20, 80))
        audio.append(speak(word, voice, speed, pitch)[:SAMPLE_RATE])
        labels.append(label)
        words.append(word)
        voices.append(voice)
        if log and (n + 1) % 200 == 0:
            log(f"  rendered {n + 1}/{len(jobs)} utterances")
    return Utterances(audio, np.array(labels), words, voices)


def save_set(u: Utterances, path: Path) -> None:
    lengths = np.array([len(a) for a in u.audio])
    pcm = (np.concatenate(u.audio) * 32767).clip(-32768, 32767).astype(np.int16)
    np.savez_compressed(path, pcm=pcm, lengths=lengths, labels=u.labels,
                        words=np.array(u.words), voices=np.array(u.voices))


def load_set(path: Path) -> Utterances:
    z = np.load(path)
    ends = np.cumsum(z["lengths"])
    pcm = z["pcm"].astype(np.float32) / 32767.0
    audio = [pcm[e - n:e] for e, n in zip(ends, z["lengths"])]
    return Utterances(audio, z["labels"], list(z["words"]), list(z["voices"]))


def load_or_render(cache: Path, name: str, variants: tuple[str, ...], per_keyword: int,
                   unknown: int, seed: int, log=None) -> Utterances:
    """The cached set ``name`` (rendered and saved on first use)."""
    tag = zlib.crc32(" ".join(variants).encode()) % 10 ** 6  # a new voice list: a new file
    path = cache / f"keywords-{name}-{per_keyword}-{unknown}-{seed}-{tag}.npz"
    if path.exists():
        return load_set(path)
    if not have_espeak():
        raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng")
    if log:
        log(f"rendering {name} utterances with espeak-ng (cached in {path})")
    u = render_set(variants, per_keyword, unknown, seed, log)
    cache.mkdir(parents=True, exist_ok=True)
    save_set(u, path)
    return u


# ---------------------------------------------------------------------------------- noise
def noise(n: int, rng: np.random.Generator, babble: Utterances | None = None) -> np.ndarray:
    """``n`` samples of unit-RMS noise: white, pink, brown, mains hum or babble."""
    kind = rng.integers(0, 5 if babble is not None else 4)
    if kind == 4:  # babble: several other words, overlapping
        x = np.zeros(n, np.float32)
        for _ in range(max(1, n // 4000)):
            a = babble.audio[int(rng.integers(len(babble.audio)))]
            a = a[:n]
            s = int(rng.integers(0, n - len(a) + 1))
            x[s:s + len(a)] += a * rng.uniform(0.3, 1.0)
    elif kind == 3:  # hum with harmonics plus a little white noise
        t = np.arange(n) / SAMPLE_RATE
        f0 = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3)) / h for h in (1, 2, 3))
        x = x + 0.1 * rng.standard_normal(n)
    else:  # white (0), pink (1), brown (2): 1/f^kind power spectra
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
        x = np.fft.irfft(spec / f ** (kind / 2.0), n)
    x = np.asarray(x, np.float32)
    return x / max(1e-8, float(np.sqrt(np.mean(x ** 2))))


def mix(speech: np.ndarray, background: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech`` plus ``background`` scaled to ``snr_db`` relative to the speech's RMS."""
    rms = float(np.sqrt(np.mean(speech[np.abs(speech) > 0] ** 2))) if speech.any() else 0.0
    return speech + background * (rms * 10 ** (-snr_db / 20.0) if rms else 0.05)


# ---------------------------------------------------------------------------------- clips
def perturb_speed(a: np.ndarray, rng: np.random.Generator,
                  speed: tuple[float, float] | None) -> np.ndarray:
    """``a`` played at a random speed in ``speed`` (linear-interpolation resampling: duration,
    pitch and formants scale together, like another vocal tract), cut to 1 s; ``None``: ``a``."""
    if speed is None:
        return a
    f = rng.uniform(*speed)
    n = min(SAMPLE_RATE, int(len(a) / f))
    return np.interp(np.arange(n) * f, np.arange(len(a)), a).astype(np.float32)


def clip_batch(u: Utterances, batch: int, rng: np.random.Generator,
               snr_range: tuple[float, float] = (0.0, 30.0),
               speed: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` 1 s clips ``(batch, 16000)`` and labels: keywords, unknown words and silence.

    About a tenth are silence/noise only, a quarter unknown words, the rest keywords; the word is
    placed at a random offset and the clip is scaled to a random peak level (-40 to 0 dBFS).
    """
    clips = np.zeros((batch, SAMPLE_RATE), np.float32)
    labels = np.zeros(batch, np.int64)
    for i in range(batch):
        r = rng.random()
        label = SILENCE if r < 0.1 else UNKNOWN if r < 0.35 else int(rng.integers(len(KEYWORDS)))
        speech = np.zeros(SAMPLE_RATE, np.float32)
        if label != SILENCE:
            idx = u.of_class(label)
            a = perturb_speed(u.audio[int(rng.choice(idx))], rng, speed)
            s = int(rng.integers(0, SAMPLE_RATE - len(a) + 1))
            speech[s:s + len(a)] = a * rng.uniform(0.3, 1.0)
        x = mix(speech, noise(SAMPLE_RATE, rng, u), float(rng.uniform(*snr_range)))
        x *= 10 ** (rng.uniform(-40.0, 0.0) / 20.0) / max(1e-6, float(np.abs(x).max()))
        clips[i], labels[i] = x, label
    return clips, labels


IGNORE = -100  # label of windows that hold only part of a keyword (left out of the loss)


def window_batch(u: Utterances, batch: int, rng: np.random.Generator,
                 snr_range: tuple[float, float] = (0.0, 25.0),
                 speed: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` 1 s windows cut at random offsets from 2 s recordings of up to two words.

    These are the windows a streaming spotter sees: a keyword wholly inside labels the window
    with the keyword; a keyword partly inside (more than 40 % of it) marks the window
    ``IGNORE``; other speech makes it unknown, none silence.
    """
    clips = np.zeros((batch, SAMPLE_RATE), np.float32)
    labels = np.zeros(batch, np.int64)
    n = 2 * SAMPLE_RATE
    for i in range(batch):
        bg = noise(n, rng, u)
        speech = np.zeros(n, np.float32)
        words, t = [], int(rng.integers(0, SAMPLE_RATE // 4))
        for _ in range(2):
            label = int(rng.integers(len(KEYWORDS))) if rng.random() < 0.5 else UNKNOWN
            a = perturb_speed(u.audio[int(rng.choice(u.of_class(label)))], rng, speed)
            if t + len(a) > n:
                break
            speech[t:t + len(a)] = a * rng.uniform(0.3, 1.0)
            words.append((t, t + len(a), label))
            t += len(a) + int(rng.integers(SAMPLE_RATE // 10, SAMPLE_RATE // 2))
        x = mix(speech, bg, float(rng.uniform(*snr_range)))
        start = int(rng.integers(0, n - SAMPLE_RATE + 1))
        label = SILENCE
        for s, e, c in words:
            cover = (min(e, start + SAMPLE_RATE) - max(s, start)) / (e - s)
            if cover <= 0:
                continue
            if c == UNKNOWN or cover <= 0.4:
                label = UNKNOWN if label == SILENCE else label
            elif cover >= 1.0 and label in (SILENCE, UNKNOWN):
                label = c
            else:
                label = IGNORE
                break
        w = x[start:start + SAMPLE_RATE]
        clips[i] = w * 10 ** (rng.uniform(-40.0, 0.0) / 20.0) / max(1e-6, float(np.abs(w).max()))
        labels[i] = label
    return clips, labels


@dataclass
class Stream:
    """A long recording and its events: sample start/end and class of every spoken word."""

    audio: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    labels: np.ndarray
    snrs: np.ndarray


def make_stream(u: Utterances, seconds: float, rng: np.random.Generator,
                gap: tuple[float, float] = (1.0, 4.0), snrs: tuple[float, ...] = (5, 10, 20),
                keyword_fraction: float = 0.6) -> Stream:
    """A recording of ``seconds`` with words at random times (``gap`` seconds of noise between).

    ``keyword_fraction`` of the words are keywords, the rest unknown words; the background noise
    changes every 10 s, and each word is mixed at an SNR drawn from ``snrs`` against it.
    """
    n = int(seconds * SAMPLE_RATE)
    bg = np.concatenate([noise(10 * SAMPLE_RATE, rng, None) * rng.uniform(0.002, 0.02)
                         for _ in range(int(np.ceil(n / (10 * SAMPLE_RATE))))])[:n]
    audio = bg.astype(np.float32).copy()
    starts, ends, labels, used = [], [], [], []
    t = int(rng.uniform(*gap) * SAMPLE_RATE)
    while True:
        label = (int(rng.integers(len(KEYWORDS))) if rng.random() < keyword_fraction
                 else UNKNOWN)
        a = u.audio[int(rng.choice(u.of_class(label)))]
        if t + len(a) >= n - SAMPLE_RATE:
            break
        snr = float(rng.choice(snrs))
        local = bg[t:t + len(a)]
        rms_bg = float(np.sqrt(np.mean(local ** 2)))
        rms_a = float(np.sqrt(np.mean(a ** 2)))
        audio[t:t + len(a)] += a * (rms_bg * 10 ** (snr / 20.0) / max(rms_a, 1e-8))
        starts.append(t)
        ends.append(t + len(a))
        labels.append(label)
        used.append(snr)
        t += len(a) + int(rng.uniform(*gap) * SAMPLE_RATE)
    peak = float(np.abs(audio).max())
    if peak > 0.99:
        audio *= 0.99 / peak
    return Stream(audio, np.array(starts), np.array(ends), np.array(labels), np.array(used))


def write_wav(path: Path, audio: np.ndarray) -> None:
    """Save float audio in [-1, 1] as a 16 kHz mono int16 WAV (standard ``wave`` module)."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def make_demo(words: tuple[str, ...], voices: tuple[str, ...], seed: int = 0,
              snr_db: float = 20.0) -> tuple[np.ndarray, list[dict]]:
    """A short recording: ``words`` spoken by ``voices`` with 0.8-1.2 s of noise between.

    Returns the audio and, per word, its text and start/end in seconds.
    """
    rng = np.random.default_rng(seed)
    parts, events, t = [], [], 0.0
    pause = np.zeros(int(0.8 * SAMPLE_RATE), np.float32)
    parts.append(pause)
    t += len(pause) / SAMPLE_RATE
    for word, voice in zip(words, voices):
        a = speak(word, voice, int(rng.integers(140, 180)), int(rng.integers(35, 65))) * 0.5
        events.append({"word": word, "voice": voice, "start": round(t, 3),
                       "end": round(t + len(a) / SAMPLE_RATE, 3)})
        gap = np.zeros(int(rng.uniform(0.8, 1.2) * SAMPLE_RATE), np.float32)
        parts += [a, gap]
        t += (len(a) + len(gap)) / SAMPLE_RATE
    speech = np.concatenate(parts)
    return mix(speech, noise(len(speech), rng), snr_db), events
