"""EVA statistics (mergeable PCA sketches) and rank allocation."""
