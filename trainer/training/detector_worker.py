"""Detector process: run by `python -m trainer prepare --detect/--closeups/--require` with the Python of the side
environment that scripts/detector-env.sh builds (mediapipe 0.10.21 pins numpy<2 and protobuf<5, which ComfyUI's
environment does not have). Only the standard library, numpy, OpenCV and mediapipe are imported here; the models are
the ones inside the mediapipe wheel (nothing is downloaded).

Protocol: stdout gets one JSON object per line. First {"ready": true, "mediapipe": version} once the models are
loaded (or {"error": "..."} and exit code 2); then for every stdin line {"image": path, "find": ["face", "hand",
"person"], "threshold": {"face": 0.5, ...}} one line {"image": path, "size": [w, h], "face": [...], "hand": [...],
"person": [...]} (each a list of {"box": [x0, y0, x1, y1] in pixels, "score": s}; a hand also has "points", its 21
landmarks in pixels) or {"image": path, "error": "..."}.

- face: the full-range face detector (BlazeFace, model_selection=1);
- hand: the palm detector and hand landmarker (static images, up to 4 hands); the box bounds the landmarks, the
  score is the handedness score;
- person: the pose landmarker (one person per picture); the box bounds its visible landmarks.
"""
from __future__ import annotations

import argparse
import json
import sys

PARTS = ("face", "hand", "person")


def load():
    import mediapipe
    from mediapipe.python.solutions import face_detection, hands, pose

    return mediapipe.__version__, {"face": face_detection, "hand": hands, "pose": pose}


class Models:
    """One model per part and threshold, made on first use and kept."""

    def __init__(self, solutions):
        self.solutions, self.made = solutions, {}

    def get(self, part: str, threshold: float):
        key = (part, threshold)
        if key not in self.made:
            if part == "face":
                self.made[key] = self.solutions["face"].FaceDetection(model_selection=1,
                                                                      min_detection_confidence=threshold)
            elif part == "hand":
                self.made[key] = self.solutions["hand"].Hands(static_image_mode=True, max_num_hands=4,
                                                              model_complexity=1, min_detection_confidence=threshold)
            else:
                self.made[key] = self.solutions["pose"].Pose(static_image_mode=True, model_complexity=1,
                                                             min_detection_confidence=threshold)
        return self.made[key]


def _box(points, w: int, h: int) -> list[float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [max(0.0, min(xs)), max(0.0, min(ys)), min(float(w), max(xs)), min(float(h), max(ys))]


def find(models: Models, rgb, part: str, threshold: float) -> list[dict]:
    h, w = rgb.shape[:2]
    result = models.get(part, threshold).process(rgb)
    if part == "face":
        out = []
        for d in result.detections or []:
            b = d.location_data.relative_bounding_box
            box = [b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h]
            out.append({"box": [max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])],
                        "score": float(d.score[0])})
        return out
    if part == "hand":
        out = []
        for marks, handed in zip(result.multi_hand_landmarks or [], result.multi_handedness or []):
            points = [[lm.x * w, lm.y * h] for lm in marks.landmark]
            out.append({"box": _box(points, w, h), "score": float(handed.classification[0].score),
                        "points": points})
        return out
    if result.pose_landmarks is None:
        return []
    seen = [lm for lm in result.pose_landmarks.landmark if lm.visibility >= 0.5] or \
        list(result.pose_landmarks.landmark)
    points = [[lm.x * w, lm.y * h] for lm in seen]
    score = sum(lm.visibility for lm in result.pose_landmarks.landmark) / len(result.pose_landmarks.landmark)
    return [{"box": _box(points, w, h), "score": float(score)}]


def answer(models: Models, request: dict) -> dict:
    import cv2

    path = request.get("image", "")
    parts = request.get("find") or []
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        return {"image": path, "error": f"unknown part(s) {unknown}; one of {list(PARTS)}"}
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        return {"image": path, "error": "cannot be read as a picture"}
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    thresholds = request.get("threshold") or {}
    out = {"image": path, "size": [int(rgb.shape[1]), int(rgb.shape[0])]}
    for part in parts:
        out[part] = find(models, rgb, part, float(thresholds.get(part, 0.5)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="import mediapipe and its models, then exit")
    args = parser.parse_args(argv)
    try:
        version, solutions = load()
    except Exception as e:  # noqa: BLE001  (any import failure is reported on the protocol's first line)
        print(json.dumps({"error": f"mediapipe cannot be loaded here ({type(e).__name__}: {e}); build the "
                                   "environment with scripts/detector-env.sh"}), flush=True)
        return 2
    if args.check:
        return 0
    models = Models(solutions)
    print(json.dumps({"ready": True, "mediapipe": version}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = answer(models, json.loads(line))
        except Exception as e:  # noqa: BLE001  (one bad request never ends the process)
            reply = {"image": str(json.loads(line).get("image", "")) if line.strip().startswith("{") else "",
                     "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
