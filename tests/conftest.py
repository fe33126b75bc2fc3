import sys
from pathlib import Path

# tests/ holds reference implementations (the tutorial's model) imported by several tests.
sys.path.insert(0, str(Path(__file__).parent))
