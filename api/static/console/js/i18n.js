// Every label of the console in English and Simplified Chinese.
//
// Elements carry their key (data-i18n, with data-i18n-vars for values) so a language switch
// relabels the page in place: the image keeps its zoom, the conversation its text.
// Clinical text (impression, findings, answers) is shown as the model wrote it.

const STRINGS = {
  en: {
    "nav.worklist": "Worklist",
    "nav.status": "Status",
    "lang.label": "Language",
    "auth.title": "Sign in",
    "auth.lead": "Paste your access token. An administrator creates one with “medgemma-node api add-user”.",
    "auth.token": "Access token",
    "auth.submit": "Sign in",
    "auth.signOut": "Sign out",
    "auth.invalid": "This token is not valid or was revoked.",
    "auth.session": "The token is kept only in this browser tab and is forgotten when it closes.",
    "auth.expired": "Please sign in again.",
    "role.viewer": "Viewer",
    "role.radiologist": "Radiologist",
    "role.admin": "Administrator",
    "live.on": "Live",
    "live.off": "Reconnecting…",
    "wl.title": "Worklist",
    "wl.search": "Search UID, AE title, body part, report text",
    "wl.status": "Status",
    "wl.allStatuses": "All statuses",
    "wl.modality": "Modality",
    "wl.allModalities": "All modalities",
    "wl.since": "From",
    "wl.until": "To",
    "wl.urgentOnly": "Urgent only",
    "wl.clear": "Clear filters",
    "wl.col.urgency": "Priority",
    "wl.col.status": "Status",
    "wl.col.patient": "Patient",
    "wl.col.modality": "Modality",
    "wl.col.bodyPart": "Body part",
    "wl.col.study": "Study",
    "wl.col.received": "Received",
    "wl.col.images": "Images",
    "wl.col.source": "From",
    "wl.empty": "No studies match these filters.",
    "wl.emptyAll": "No studies yet. A study appears here as soon as its first image is received.",
    "wl.count": "{from}–{to} of {total}",
    "wl.newer": "Newer",
    "wl.older": "Older",
    "wl.loading": "Loading…",
    "wl.urgentHidden": "{n} non-urgent studies on this page are hidden",
    "status.receiving": "Receiving",
    "status.waiting": "Waiting to retry",
    "status.queued": "Queued",
    "status.reporting": "Reporting",
    "status.reported": "Reported",
    "status.delivered": "Delivered",
    "status.failed": "Failed",
    "status.out_of_scope": "Out of scope",
    "status.cancelled": "Cancelled",
    "urgency.routine": "Routine",
    "urgency.urgent": "Urgent",
    "urgency.critical": "Critical",
    "study.back": "Worklist",
    "study.unknownPatient": "Unknown patient",
    "study.notFound": "This study is not on the node.",
    "study.accession": "Accession {value}",
    "viewer.modelView": "Model view",
    "viewer.modelViewTitle": "The 896 × 896 padded square the model saw",
    "viewer.fullSize": "Full size",
    "viewer.fullSizeTitle": "The image at its stored size",
    "viewer.zoomIn": "Zoom in",
    "viewer.zoomOut": "Zoom out",
    "viewer.fit": "Fit",
    "viewer.actual": "1:1",
    "viewer.window": "Display",
    "viewer.windowNote": "Display windows act on the rendered image (the API has no window parameter).",
    "viewer.boxes": "Boxes",
    "viewer.image": "Image {n} of {total}",
    "viewer.prevImage": "Previous image",
    "viewer.nextImage": "Next image",
    "viewer.loading": "Loading image…",
    "viewer.error": "The image cannot be shown: {detail}",
    "viewer.noImage": "No image in this study yet.",
    "viewer.dims": "{columns} × {rows} px",
    "viewer.spacing": "{row} × {col} mm per pixel ({source})",
    "viewer.noSpacing": "No pixel spacing in the header: sizes in pixels only",
    "viewer.zoom": "{pct}%",
    "viewer.hint": "Scroll to zoom · drag to pan",
    "spacing.ImagerPixelSpacing": "Imager Pixel Spacing, at the detector",
    "spacing.PixelSpacing": "Pixel Spacing",
    "window.none": "As rendered",
    "window.lung": "Lung (dark range)",
    "window.soft": "Soft tissue (mid range)",
    "window.bone": "Bone (bright range)",
    "window.contrast": "High contrast",
    "window.invert": "Inverted",
    "tab.report": "Report",
    "tab.ask": "Ask",
    "report.none": "No report yet. The study is {status}.",
    "report.notice": "AI-generated, preliminary, not verified — must be reviewed by a physician.",
    "report.testModel": "TEST MODEL – NOT FOR CLINICAL USE",
    "report.outOfScope": "Outside the model's validated scope.",
    "report.version": "Report #{id} · version {version}",
    "report.versions": "Versions",
    "report.current": "current",
    "report.supersededBy": "superseded by #{id}",
    "report.supersedes": "supersedes #{id}",
    "report.show": "Show",
    "report.impression": "Impression",
    "report.findings": "Findings",
    "report.noFindings": "No findings listed.",
    "report.col.anchor": "Region",
    "report.col.finding": "Finding",
    "report.col.location": "Location",
    "report.col.size": "Size",
    "report.col.density": "Density",
    "report.col.boundary": "Boundary",
    "report.sizeModel": "model {mm} mm",
    "report.boxMm": "box {w}×{h} mm",
    "report.boxPx": "box {w}×{h} px",
    "report.recommendation": "Recommendation",
    "report.urgency": "Urgency",
    "report.narrative": "Model text",
    "report.comparison": "Comparison",
    "report.followUp": "Follow-up questions",
    "report.model": "Model",
    "report.created": "Created",
    "report.question": "Question asked",
    "report.parse.ok": "Structured result",
    "report.parse.narrative_only": "Narrative only (no structured result)",
    "report.parse.empty": "The model gave no text",
    "report.downloads": "Downloads",
    "report.dlSr": "DICOM SR",
    "report.dlJson": "JSON",
    "report.dlPdf": "PDF",
    "report.downloadFailed": "Download failed: {detail}",
    "chat.notice": "Answers are preliminary AI output; the model was not evaluated for multi-turn conversations.",
    "chat.regions": "Regions",
    "chat.noRegions": "No regions marked yet.",
    "chat.about": "About {id}",
    "chat.clearAbout": "Ask about the whole study",
    "chat.placeholder": "Ask about this study…",
    "chat.send": "Ask",
    "chat.sending": "Waiting for the model…",
    "chat.question": "Question",
    "chat.answer": "Answer",
    "chat.byNode": "measured by the node",
    "chat.newRegions": "New regions",
    "chat.refers": "about {id}",
    "chat.empty": "Ask about findings, sizes or distances. Click a region to ask about it.",
    "chat.viewerNote": "Your role can read conversations; asking and appending need the radiologist role.",
    "chat.append": "Append to report",
    "chat.appendConfirm": "Append {n} question(s) and answer(s) to the report as a new version? It supersedes the current report and goes to PACS and the HIS as a correction.",
    "chat.appended": "Appended as report #{id}.",
    "chat.appendedState": "This conversation is part of the report now. A new question starts a new conversation.",
    "chat.busy": "Too many questions are waiting; try again in {s} s.",
    "chat.noReport": "Questions can be asked once the study has a report.",
    "common.confirm": "Confirm",
    "common.cancel": "Cancel",
    "common.none": "—",
    "common.error": "Something went wrong: {detail}",
    "common.forbidden": "Your role may not do this.",
    "common.offline": "The node does not answer.",
    "st.title": "Node status",
    "st.checked": "Checked {time}",
    "st.node": "Node",
    "st.scp": "DICOM SCP",
    "st.listening": "answers C-ECHO",
    "st.notListening": "does not answer",
    "st.serving": "Serving process",
    "st.running": "running",
    "st.notRunning": "not running",
    "st.database": "Database",
    "st.reachable": "reachable",
    "st.parts": "Parts",
    "st.ok": "ok",
    "st.model": "Model",
    "st.loaded": "Loaded",
    "st.notLoaded": "Not loaded ({status})",
    "st.queue": "Queue",
    "st.studies": "Studies",
    "st.instances": "Images",
    "st.job.queued": "Queued",
    "st.job.running": "Running",
    "st.job.done": "Done",
    "st.job.failed": "Failed",
    "st.job.cancelled": "Cancelled",
    "st.job.skipped": "Out of scope",
    "st.waitingRetry": "Waiting for a retry",
    "st.oldest": "Oldest queued",
    "st.destinations": "Destinations",
    "st.col.name": "Name",
    "st.col.kind": "Kind",
    "st.col.target": "Target",
    "st.col.pending": "Pending",
    "st.col.sent": "Sent",
    "st.col.dead": "Given up",
    "st.col.lastSent": "Last sent",
    "st.col.lastError": "Last error",
    "st.noDestinations": "No destinations are configured.",
    "st.notConfigured": "no longer configured",
    "st.disabled": "disabled",
    "st.retryDead": "Retry given-up",
    "st.retried": "{n} deliveries queued again.",
    "st.disk": "Disk",
    "st.diskFree": "{free} free; C-STORE is refused below {watermark}",
    "st.diskLow": "Low disk space: new images are refused",
  },
  zh: {
    "nav.worklist": "工作列表",
    "nav.status": "状态",
    "lang.label": "语言",
    "auth.title": "登录",
    "auth.lead": "请粘贴访问令牌。管理员可用 “medgemma-node api add-user” 创建。",
    "auth.token": "访问令牌",
    "auth.submit": "登录",
    "auth.signOut": "退出",
    "auth.invalid": "令牌无效或已被撤销。",
    "auth.session": "令牌仅保存在当前浏览器标签页中，关闭后即失效。",
    "auth.expired": "请重新登录。",
    "role.viewer": "查看者",
    "role.radiologist": "放射科医师",
    "role.admin": "管理员",
    "live.on": "实时",
    "live.off": "正在重连…",
    "wl.title": "工作列表",
    "wl.search": "搜索 UID、AE 名称、检查部位、报告文本",
    "wl.status": "状态",
    "wl.allStatuses": "全部状态",
    "wl.modality": "设备类型",
    "wl.allModalities": "全部类型",
    "wl.since": "起始",
    "wl.until": "截止",
    "wl.urgentOnly": "仅紧急",
    "wl.clear": "清除筛选",
    "wl.col.urgency": "优先级",
    "wl.col.status": "状态",
    "wl.col.patient": "患者",
    "wl.col.modality": "类型",
    "wl.col.bodyPart": "部位",
    "wl.col.study": "检查",
    "wl.col.received": "接收时间",
    "wl.col.images": "图像",
    "wl.col.source": "来源",
    "wl.empty": "没有符合筛选条件的检查。",
    "wl.emptyAll": "尚无检查。收到第一幅图像后，检查会立即显示在这里。",
    "wl.count": "第 {from}–{to} 条，共 {total} 条",
    "wl.newer": "较新",
    "wl.older": "较早",
    "wl.loading": "加载中…",
    "wl.urgentHidden": "本页已隐藏 {n} 个非紧急检查",
    "status.receiving": "接收中",
    "status.waiting": "等待重试",
    "status.queued": "排队中",
    "status.reporting": "分析中",
    "status.reported": "已出报告",
    "status.delivered": "已发送",
    "status.failed": "失败",
    "status.out_of_scope": "超出适用范围",
    "status.cancelled": "已取消",
    "urgency.routine": "常规",
    "urgency.urgent": "紧急",
    "urgency.critical": "危急",
    "study.back": "工作列表",
    "study.unknownPatient": "未知患者",
    "study.notFound": "节点上没有此检查。",
    "study.accession": "检查号 {value}",
    "viewer.modelView": "模型视图",
    "viewer.modelViewTitle": "模型所见的 896 × 896 填充方图",
    "viewer.fullSize": "原始尺寸",
    "viewer.fullSizeTitle": "按存储尺寸显示图像",
    "viewer.zoomIn": "放大",
    "viewer.zoomOut": "缩小",
    "viewer.fit": "适应窗口",
    "viewer.actual": "1:1",
    "viewer.window": "显示窗",
    "viewer.windowNote": "显示窗作用于渲染后的图像（API 不提供窗宽窗位参数）。",
    "viewer.boxes": "标注框",
    "viewer.image": "第 {n} / {total} 幅",
    "viewer.prevImage": "上一幅",
    "viewer.nextImage": "下一幅",
    "viewer.loading": "正在加载图像…",
    "viewer.error": "无法显示图像：{detail}",
    "viewer.noImage": "此检查暂无图像。",
    "viewer.dims": "{columns} × {rows} 像素",
    "viewer.spacing": "每像素 {row} × {col} mm（{source}）",
    "viewer.noSpacing": "文件头中无像素间距：尺寸仅以像素表示",
    "viewer.zoom": "{pct}%",
    "viewer.hint": "滚轮缩放 · 拖动平移",
    "spacing.ImagerPixelSpacing": "成像器像素间距，探测器平面",
    "spacing.PixelSpacing": "像素间距",
    "window.none": "原始显示",
    "window.lung": "肺（暗部）",
    "window.soft": "软组织（中间）",
    "window.bone": "骨（亮部）",
    "window.contrast": "高对比度",
    "window.invert": "反相",
    "tab.report": "报告",
    "tab.ask": "提问",
    "report.none": "尚无报告。检查状态：{status}。",
    "report.notice": "AI 生成的初步结果，未经核实，须由医师审核。",
    "report.testModel": "测试模型 – 不可用于临床",
    "report.outOfScope": "超出模型验证的适用范围。",
    "report.version": "报告 #{id} · 第 {version} 版",
    "report.versions": "版本",
    "report.current": "当前",
    "report.supersededBy": "已被 #{id} 取代",
    "report.supersedes": "取代 #{id}",
    "report.show": "查看",
    "report.impression": "印象",
    "report.findings": "所见",
    "report.noFindings": "未列出所见。",
    "report.col.anchor": "区域",
    "report.col.finding": "所见",
    "report.col.location": "位置",
    "report.col.size": "大小",
    "report.col.density": "密度",
    "report.col.boundary": "边界",
    "report.sizeModel": "模型 {mm} mm",
    "report.boxMm": "框 {w}×{h} mm",
    "report.boxPx": "框 {w}×{h} 像素",
    "report.recommendation": "建议",
    "report.urgency": "紧急程度",
    "report.narrative": "模型原文",
    "report.comparison": "对比",
    "report.followUp": "追问",
    "report.model": "模型",
    "report.created": "生成时间",
    "report.question": "提问内容",
    "report.parse.ok": "结构化结果",
    "report.parse.narrative_only": "仅叙述（无结构化结果）",
    "report.parse.empty": "模型未给出文本",
    "report.downloads": "下载",
    "report.dlSr": "DICOM SR",
    "report.dlJson": "JSON",
    "report.dlPdf": "PDF",
    "report.downloadFailed": "下载失败：{detail}",
    "chat.notice": "回答为 AI 初步结果；该模型未针对多轮对话进行评估。",
    "chat.regions": "区域",
    "chat.noRegions": "尚未标出区域。",
    "chat.about": "关于 {id}",
    "chat.clearAbout": "针对整个检查提问",
    "chat.placeholder": "就此检查提问…",
    "chat.send": "提问",
    "chat.sending": "等待模型回答…",
    "chat.question": "问",
    "chat.answer": "答",
    "chat.byNode": "由节点测量",
    "chat.newRegions": "新区域",
    "chat.refers": "关于 {id}",
    "chat.empty": "可询问所见、大小或距离。点击区域即可针对该区域提问。",
    "chat.viewerNote": "您的角色只能查看对话；提问和追加到报告需要放射科医师角色。",
    "chat.append": "追加到报告",
    "chat.appendConfirm": "将 {n} 组问答作为新版本追加到报告？新版本将取代当前报告，并作为更正发送至 PACS 和 HIS。",
    "chat.appended": "已追加为报告 #{id}。",
    "chat.appendedState": "此对话已并入报告。再次提问将开始新的对话。",
    "chat.busy": "等待中的问题过多，请 {s} 秒后重试。",
    "chat.noReport": "检查出报告后即可提问。",
    "common.confirm": "确认",
    "common.cancel": "取消",
    "common.none": "—",
    "common.error": "出错了：{detail}",
    "common.forbidden": "您的角色无权执行此操作。",
    "common.offline": "节点无响应。",
    "st.title": "节点状态",
    "st.checked": "检查于 {time}",
    "st.node": "节点",
    "st.scp": "DICOM SCP",
    "st.listening": "C-ECHO 正常",
    "st.notListening": "无响应",
    "st.serving": "服务进程",
    "st.running": "运行中",
    "st.notRunning": "未运行",
    "st.database": "数据库",
    "st.reachable": "可访问",
    "st.parts": "组件",
    "st.ok": "正常",
    "st.model": "模型",
    "st.loaded": "已加载",
    "st.notLoaded": "未加载（{status}）",
    "st.queue": "队列",
    "st.studies": "检查",
    "st.instances": "图像",
    "st.job.queued": "排队中",
    "st.job.running": "运行中",
    "st.job.done": "完成",
    "st.job.failed": "失败",
    "st.job.cancelled": "已取消",
    "st.job.skipped": "超出适用范围",
    "st.waitingRetry": "等待重试",
    "st.oldest": "最早排队",
    "st.destinations": "发送目标",
    "st.col.name": "名称",
    "st.col.kind": "类型",
    "st.col.target": "地址",
    "st.col.pending": "待发送",
    "st.col.sent": "已发送",
    "st.col.dead": "已放弃",
    "st.col.lastSent": "最近发送",
    "st.col.lastError": "最近错误",
    "st.noDestinations": "未配置发送目标。",
    "st.notConfigured": "已不在配置中",
    "st.disabled": "已停用",
    "st.retryDead": "重试已放弃项",
    "st.retried": "已重新排队 {n} 项。",
    "st.disk": "磁盘",
    "st.diskFree": "可用 {free}；低于 {watermark} 时拒绝 C-STORE",
    "st.diskLow": "磁盘空间不足：新图像将被拒绝",
  },
};

export const LANGUAGES = Object.keys(STRINGS);
const STORAGE_KEY = "mgn.lang";
let language = "en";

export function keys(lang) {
  return Object.keys(STRINGS[lang]);
}

export function getLanguage() {
  return language;
}

/** The user's last choice in this browser, else the node's default ([model] language). */
export function initialLanguage(nodeDefault) {
  const chosen = localStorage.getItem(STORAGE_KEY);
  if (chosen && STRINGS[chosen]) return chosen;
  return STRINGS[nodeDefault] ? nodeDefault : "en";
}

export function setLanguage(lang, remember = false) {
  language = STRINGS[lang] ? lang : "en";
  if (remember) localStorage.setItem(STORAGE_KEY, language);
  document.documentElement.lang = language === "zh" ? "zh-CN" : "en";
  applyLanguage(document);
}

export function t(key, vars = {}) {
  const text = STRINGS[language][key] ?? STRINGS.en[key] ?? key;
  // A value {$t: key} is itself translated (a status named inside a sentence).
  return text.replace(/\{(\w+)\}/g, (_, name) => {
    if (!(name in vars)) return `{${name}}`;
    const value = vars[name];
    return value && typeof value === "object" && value.$t ? t(value.$t) : String(value);
  });
}

/** Give an element its translated text and remember the key, for a later language switch. */
export function label(element, key, vars) {
  element.dataset.i18n = key;
  if (vars) element.dataset.i18nVars = JSON.stringify(vars);
  else delete element.dataset.i18nVars;
  element.textContent = t(key, vars);
  return element;
}

/** Empty a labelled element, and forget its key (a language switch leaves it empty). */
export function unlabel(element) {
  delete element.dataset.i18n;
  delete element.dataset.i18nVars;
  element.textContent = "";
  return element;
}

/** Relabel everything under ``root``: text, placeholders, titles, aria-labels, times. */
export function applyLanguage(root) {
  for (const element of root.querySelectorAll("[data-i18n]")) {
    const vars = element.dataset.i18nVars ? JSON.parse(element.dataset.i18nVars) : undefined;
    element.textContent = t(element.dataset.i18n, vars);
  }
  for (const [attribute, data] of [
    ["placeholder", "i18nPlaceholder"],
    ["title", "i18nTitle"],
    ["aria-label", "i18nAria"],
  ]) {
    const selector = `[data-${data.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase())}]`;
    for (const element of root.querySelectorAll(selector)) {
      element.setAttribute(attribute, t(element.dataset[data]));
    }
  }
  for (const element of root.querySelectorAll("[data-time]")) {
    element.textContent = formatTime(element.dataset.time, element.dataset.timeStyle);
  }
}

function locale() {
  return language === "zh" ? "zh-CN" : "en-GB";
}

/** An ISO time as local date and time ("full"), time of day ("clock") or relative to now. */
export function formatTime(iso, style = "full") {
  if (!iso) return t("common.none");
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return iso;
  if (style === "clock") return new Intl.DateTimeFormat(locale(), { timeStyle: "medium" }).format(when);
  if (style === "relative") {
    const seconds = Math.round((when.getTime() - Date.now()) / 1000);
    const relative = new Intl.RelativeTimeFormat(locale(), { numeric: "auto" });
    const abs = Math.abs(seconds);
    if (abs < 60) return relative.format(seconds, "second");
    if (abs < 3600) return relative.format(Math.round(seconds / 60), "minute");
    if (abs < 86400) return relative.format(Math.round(seconds / 3600), "hour");
  }
  return new Intl.DateTimeFormat(locale(), { dateStyle: "medium", timeStyle: "short" }).format(when);
}

/** An element showing a time, reformatted on a language switch. */
export function timeElement(tag, iso, style = "full") {
  const element = document.createElement(tag);
  element.dataset.time = iso || "";
  element.dataset.timeStyle = style;
  element.textContent = formatTime(iso, style);
  if (iso) element.title = new Date(iso).toISOString();
  return element;
}

/** DICOM DA (YYYYMMDD, PS3.5 6.2) as YYYY-MM-DD. */
export function formatDicomDate(value) {
  const match = /^(\d{4})(\d{2})(\d{2})$/.exec(value || "");
  return match ? `${match[1]}-${match[2]}-${match[3]}` : value || "";
}

/** DICOM PN (PS3.5 6.2.1): component groups split by "=", components by "^". Shows the
 * ideographic group in Chinese when there is one, else the alphabetic one. */
export function formatPersonName(value) {
  if (!value) return "";
  const groups = value.split("=").map((group) =>
    group.split("^").map((part) => part.trim()).filter(Boolean),
  );
  const ideographic = groups[1] && groups[1].length ? groups[1] : null;
  if (language === "zh" && ideographic) return ideographic.join("");
  const [family, given, middle, prefix, suffix] = groups[0];
  const alphabetic = [prefix, family && given ? `${family}, ${given}` : family || given, middle, suffix]
    .filter(Boolean)
    .join(" ");
  return alphabetic || (ideographic ? ideographic.join("") : "");
}
