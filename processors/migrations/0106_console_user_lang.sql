-- The console remembers each user's language (alerts/i18n): null until they pick one.
alter table console_users add column if not exists lang text;
