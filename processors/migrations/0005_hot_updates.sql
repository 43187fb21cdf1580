-- sensor_latest is rewritten for every sensor in every batch: leave room on each page so
-- those updates are HOT (heap-only: no index entry, no new page) instead of full updates.
alter table sensor_latest set (fillfactor = 60);
