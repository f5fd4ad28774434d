"""What crosses process and disk boundaries, with strict readers: rollout samples as Arrow records (`sample`),
prompt files and their resumable cursor (`prompts`), Wan / Self Forcing / Reward Forcing weight files
(`checkpoint`) and MP4 / WebM video files (`video_io`)."""
