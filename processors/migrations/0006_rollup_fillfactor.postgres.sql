-- Plain-mode rollup rows are merged (updated) by later batches of the same window: leave
-- room for HOT updates, as for sensor_latest (0005).
alter table sensor_rollup_1m set (fillfactor = 70);
alter table sensor_rollup_1h set (fillfactor = 60);
alter table district_rollup_1m set (fillfactor = 60);
alter table district_rollup_1h set (fillfactor = 60);
