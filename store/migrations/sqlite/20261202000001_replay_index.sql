-- A rotation ends the replays of its family's older generations (WRITE_ISSUE_*: UPDATE ...
-- WHERE family = ? AND generation < ? AND replay IS NOT NULL). Through the family index that
-- visited every generation of the family, one more per rotation: a long chain of refreshes
-- made each rotation slower than the last. Only the immediate predecessor of a family's live
-- token holds a replay, so this index holds one row per family at most.
CREATE INDEX refresh_tokens_family_replay ON refresh_tokens (family) WHERE replay IS NOT NULL;
